#!/usr/bin/env bash
# NSA's speed targets (issue 19) in one run: per N in SEQS, at H query heads in G GQA groups, D 128,
#   ours:    `dmatrain bench attention --nsa` (the core: compression MLPs, compressed attention,
#            selection, selected and window attention, gates) and our dense causal attention at the
#            same shape (the ≥ 6× forward / ≥ 4× forward+backward targets);
#   anchors: scripts/anchors/nsa_flex.py (the same core with FlexAttention; its --check first) and
#            scripts/anchors/nsa_public.py (the public Triton NSA kernels, a git-ignored copy in
#            NSA_ANCHOR, default .anchors/flash-nsa; skipped with a note when absent).
#   scripts/bench_nsa.sh            # SEQS="16384 65536" H=64 G=4
# Environment: SEQS, H, G, BUILD (default build), NSA_ANCHOR, FLEX_MAX (default 65536: the flex
# anchor's largest N). Every line is JSON (ours: dmatrain's bench output), so a run's log is its table.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BUILD:-build}/dmatrain
SEQS=${SEQS:-16384 65536}
H=${H:-64}
G=${G:-4}
NSA_ANCHOR=${NSA_ANCHOR:-.anchors/flash-nsa}
FLEX_MAX=${FLEX_MAX:-65536}
python3 scripts/anchors/nsa_flex.py --check --heads "$H" --kv-heads "$G" --dim 128
for n in $SEQS; do
  "$BIN" bench attention --seq "$n" --heads "$H" --kv-heads "$G" --dim 128 --nsa
  "$BIN" bench attention --seq "$n" --heads "$H" --kv-heads "$G" --dim 128
  [ "$n" -le "$FLEX_MAX" ] && python3 scripts/anchors/nsa_flex.py --seq "$n" --heads "$H" --kv-heads "$G" --dim 128
  if [ -d "$NSA_ANCHOR/flash_nsa" ]; then
    python3 scripts/anchors/nsa_public.py --path "$NSA_ANCHOR" --seq "$n" --heads "$H" --kv-heads "$G" --dim 128
  else
    echo "{\"anchor\": \"flash_nsa\", \"error\": \"no copy at $NSA_ANCHOR (git-ignored; see scripts/anchors/nsa_public.py)\"}"
  fi
done
