#!/usr/bin/env bash
# CPU fp32 screening, after arc.sh: perplexity by position on 16 held-out Brown documents of 2,048 tokens.
set -x
while [ ! -f /tmp/cpu/arc.done ]; do sleep 10; done
cd /work/main
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
L=.venv/bin/linearize
C=/tmp/cpu
ARGS="--tasks none --passkey-lengths none --sequences 16 --seq-len 2048 --batch-size 4"
$L eval smollm2-135m $ARGS --out $C/p_base; echo $? > $C/p_base.rc
for r in soup50 run rund soup25 soup75; do
  $L eval $C/$r --stages stage2 --no-baselines $ARGS --out $C/p_$r; echo $? > $C/p_$r.rc
done
touch $C/ppl.done
