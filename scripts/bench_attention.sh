#!/usr/bin/env bash
# Attention kernels: ours (`dmatrain bench attention`) beside ../shared/anchors/attention.py
# (FlashAttention-2 and cuDNN through PyTorch SDPA, DMA through FlexAttention) in one run.
#   scripts/bench_attention.sh [ANCHORS_DIR]      (default .anchors, a copy of ../shared/anchors)
# Environment: SEQS (default "16384"), WINDOWS for SWA rows (default "1024 2048"), SKIP_FLEX=1.
set -uo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${1:-.anchors}
BIN=${BUILD:-build}/dmatrain
SEQS=${SEQS:-16384}
WINDOWS=${WINDOWS:-1024 2048}
for n in $SEQS; do
  "$BIN" bench attention --seq "$n" --heads 16 --dim 128
  "$BIN" bench attention --seq "$n" --heads 16 --dim 128 --nondeterministic
  for w in $WINDOWS; do "$BIN" bench attention --seq "$n" --heads 16 --dim 128 --window "$w"; done
  if [ -f "$ANCHORS/attention.py" ]; then
    flex=--skip-flex
    [ "${SKIP_FLEX:-1}" = 0 ] && flex=""
    python3 "$ANCHORS/attention.py" --seq "$n" --heads 16 --dim 128 $flex
  fi
done
