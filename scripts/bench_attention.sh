#!/usr/bin/env bash
# Attention kernels: ours (`dmatrain bench attention`) beside ../shared/anchors/attention.py
# (FlashAttention-2 and cuDNN through PyTorch SDPA, DMA through FlexAttention) in one run.
#   scripts/bench_attention.sh [ANCHORS_DIR]      (default .anchors, a copy of ../shared/anchors)
# Per N in SEQS: dense causal (deterministic and not), SWA and DMA for each w in WINDOWS, NSA's core
# at the paper's blocks and w = 512 with NSA_KV_HEADS KV heads (default 1: the paper's 16 heads per
# group; its line reports the per-part times and the workspace), then the anchor at that N
# (FlexAttention's DMA only where N <= FLEX_MAX: it builds its mask densely).
# Environment: SEQS (default "4096 16384 32768 65536 131072"), WINDOWS (default "1024 2048"),
# FLEX_MAX (default 16384; 0: no FlexAttention), ANCHOR_MAX (default 32768: SDPA rows up to this N),
# NSA_KV_HEADS (default 1), BUILD (default build). H=16, D=128, B=1 throughout.
set -uo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${1:-.anchors}
BIN=${BUILD:-build}/dmatrain
SEQS=${SEQS:-4096 16384 32768 65536 131072}
WINDOWS=${WINDOWS:-1024 2048}
FLEX_MAX=${FLEX_MAX:-16384}
ANCHOR_MAX=${ANCHOR_MAX:-32768}
NSA_KV_HEADS=${NSA_KV_HEADS:-1}
for n in $SEQS; do
  "$BIN" bench attention --seq "$n" --heads 16 --dim 128
  "$BIN" bench attention --seq "$n" --heads 16 --dim 128 --nondeterministic
  for w in $WINDOWS; do
    "$BIN" bench attention --seq "$n" --heads 16 --dim 128 --window "$w"
    "$BIN" bench attention --seq "$n" --heads 16 --dim 128 --dma "$w"
  done
  "$BIN" bench attention --seq "$n" --heads 16 --kv-heads "$NSA_KV_HEADS" --dim 128 --nsa
  if [ -f "$ANCHORS/attention.py" ] && [ "$n" -le "$ANCHOR_MAX" ]; then
    for w in $WINDOWS; do
      flex=--skip-flex
      [ "$n" -le "$FLEX_MAX" ] && flex=""
      python3 "$ANCHORS/attention.py" --seq "$n" --heads 16 --dim 128 --window "$w" $flex
    done
  fi
done
