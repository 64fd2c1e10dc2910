#!/usr/bin/env bash
# CPU fp32: perplexity on the gate's 64 held-out Brown documents of 2,048 tokens, baselines and two blends.
set -x
cd /work/main
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
L=.venv/bin/linearize
C=/tmp/cpu
ARGS="--tasks none --passkey-lengths none --sequences 64 --seq-len 2048 --batch-size 4"
$L eval smollm2-135m $ARGS --out $C/q_base; echo $? > $C/q_base.rc
for r in soup25 soup50; do
  $L eval $C/$r --stages stage2 --no-baselines $ARGS --out $C/q_$r; echo $? > $C/q_$r.rc
done
touch $C/ppl64.done
