#!/usr/bin/env bash
# Issue 6, one H100 lease. Stage-2 candidates on the keep-3 run's stitched stage-1 state (session 13, q15):
#   blends: no training; the 50/50 and 25/75 blends (next-token share first) of session 13's next-token and distilled
#           adapters (linearize finetune --mix), both full-set evaluations side by side (~9 min). Ran in session 15.
#   mixed:  stage 2 on the mixed objective (configs/runs/smollm2-quality-20m-window128-keep3-mixed.yaml,
#           0.5 CE + 0.5 KL), then its full-set evaluation (~10 + 7 min). Ran in session 16 (session 15's first
#           machine was taken back mid-training).
# The candidates (mixed at w = 0.5, the 50/50 blend) were fixed before session 14's CPU screen of the blends on ARC-c
# (docs/results.md section 7) measured any of them; the 25/75 blend was picked after that screen.
# Baselines are not rerun: they reproduced bit for bit in both session-13 leases and session 10 (committed JSON).
#   bash .devstage/q17/q17.sh blends|mixed ; then watch SECS (also packs into $OUT: a machine taken back mid-chain
#   leaves what the last watch packed) ; pack
# Staging (64 MiB a call; see DEVICE.md): .devstage/q17/ holds this script, items_full.json.gz (`python -m
# pipeline.zero_shot export`), k3run.tar.gz (session 13's keep-3 run: /work/.device/9/q15_run.tar.gz) and
# q16_rund.tar.gz (its distilled stage 2: /work/.device/19/q16_rund.tar.gz); the assets tar (model, ShareGPT,
# Brown wheels from ~/.cache/linearize/downloads) goes in 5 chunks of 24 MiB (stash.sh each), the first beside
# .device (bash .device/install.sh). The machine is given back after ~30 s idle: make the staging calls back to back.
set -u
W=/tmp/q17
export PYTHONPATH=/tmp/head:/tmp/site PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 LINEARIZE_CACHE=/tmp/lincache \
  HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
ITEMS=$W/items_full.json.gz
FULL="--items-file $ITEMS --limit all --mmlu-limit all --passkey-trials 20 --batch-size 16"
KEEP3=configs/runs/smollm2-quality-20m-window128-keep3.yaml
MIXED=configs/runs/smollm2-quality-20m-window128-keep3-mixed.yaml
L="python3 -m pipeline.cli"

unpack() {  # the code, the items, session 13's two runs and the assets; then cd to the code
  mkdir -p $W /tmp/head /tmp/lincache
  tar --exclude=./.devstage --exclude=./.device --exclude=./.venv -cf - . | tar -C /tmp/head -xf -
  cp .devstage/q17/items_full.json.gz $ITEMS
  tar -C $W -xzf .devstage/q17/k3run.tar.gz          # $W/run: keep-3, next-token stage 2 (session 13)
  tar -C $W -xzf .devstage/q17/q16_rund.tar.gz       # $W/rund: its distilled stage 2 (adapter, no stitched/)
  cp -r $W/run/stitched $W/rund/                      # the stitched state it was trained from
  tar -C /tmp/lincache -xf /tmp/devstage/assets.out
  cd /tmp/head
}

detach() {  # runs $1 (a bash script) in its own session after `linearize assets`, so the call can return
  nohup setsid bash -c "
    $L assets > $W/assets.log 2>&1 || { echo assets failed > $W/chain.rc; exit 1; }
    $1
    echo 0 > $W/chain.rc
  " > $W/chain.log 2>&1 < /dev/null &
  sleep 20; cat $W/chain.log; nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
}

pack() {
  mkdir -p $OUT; cd $W
  tar -czf $OUT/q17_results.tar.gz *.log *.rc t_* e_* 2>/dev/null
  tar -czf $OUT/q17_runs.tar.gz runm/plan.json runm/run.yaml runm/stage_times.json runm/state.json \
      runm/stage1_source.json runm/finetune/result.json runm/finetune/plan.json runm/finetune/adapter \
      soup*/run.yaml soup*/state.json soup*/stage1_source.json soup*/finetune 2>/dev/null
  ls -la $OUT
}

case "$1" in
blends)
  unpack
  detach "
    for pair in '50 0.5 0.5' '25 0.25 0.75'; do
      set -- \$pair
      (b=\$1; $L run $KEEP3 --run-dir $W/soup\$b --stage1-from $W/run --until stitch > $W/soup\$b.log 2>&1
       $L finetune $W/soup\$b --mix $W/run $W/rund --weights \$2 \$3 >> $W/soup\$b.log 2>&1
       $L eval $W/soup\$b --stages stage2 --no-baselines $FULL --out $W/e_soup\$b >> $W/soup\$b.log 2>&1
       echo \$? > $W/soup\$b.rc; date +%s > $W/t_soup\$b) &
      sleep 5
    done
    wait"
  ;;
mixed)
  unpack
  detach "
    $L run $MIXED --run-dir $W/runm --stage1-from $W/run --until finetune > $W/runm.log 2>&1
    echo \$? > $W/runm.rc; date +%s > $W/t_runm
    $L eval $W/runm --stages stage2 --no-baselines $FULL --out $W/e_mixed > $W/mixed.log 2>&1
    echo \$? > $W/mixed.rc; date +%s > $W/t_mixed"
  ;;
watch)
  sleep "${2:-60}"
  for f in $W/*.rc; do [ -f "$f" ] && echo "$f: $(cat $f)"; done
  for f in $W/runm.log $W/soup50.log $W/soup25.log $W/mixed.log; do
    [ -f $f ] && { echo "== $f"; tail -c 1500 $f | tr '\r' '\n' | grep -v '^ *$' | tail -n 3; }
  done
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
  pack > /dev/null
  ;;
pack)
  pack
  ;;
*)
  echo "usage: $0 blends|mixed|watch SECS|pack" >&2; exit 2
  ;;
esac
