#!/usr/bin/env bash
# Session 14, CPU fp32 screening (2-core AMD EPYC, no GPU lent): ARC-c (all 1,172 test questions) along the blend
# of the keep-3 adapters, w x next-token + (1 - w) x distilled, w = 0, 0.25, 0.5, 0.75, 1. Before it:
#   mkdir -p /tmp/cpu && cd /tmp/cpu && tar -xzf q15_run.tar.gz && tar -xzf q16_rund.tar.gz && cp -r run/stitched rund/
# (session 13's keep-3 next-token run and its distilled stage 2, from the H100; the tarballs hold the stitched state,
# plan, run.yaml and adapters). Then: python -m pipeline.evaluate combine --baselines e_base/results.json ...
# e_rund/results.json:blend-ce0 e_soup25/results.json:blend-ce25 ... e_run/results.json:blend-ce100.
set -x
cd /work/main
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
L=.venv/bin/linearize
C=/tmp/cpu
ARGS="--tasks arc_challenge --limit all --passkey-lengths none --sequences 1 --seq-len 128 --batch-size 16"
KEEP3=configs/runs/smollm2-quality-20m-window128-keep3.yaml
for w in 50 25 75; do
  a=$(python3 -c "print($w/100)"); b=$(python3 -c "print(1-$w/100)")
  $L run $KEEP3 --run-dir $C/soup$w --stage1-from $C/run --until stitch
  $L finetune $C/soup$w --mix $C/run $C/rund --weights $a $b
done
$L eval smollm2-135m $ARGS --out $C/e_base; echo $? > $C/e_base.rc
for r in soup50 run rund soup25 soup75; do
  $L eval $C/$r --stages stage2 --no-baselines $ARGS --out $C/e_$r; echo $? > $C/e_$r.rc
done
