#!/usr/bin/env bash
# Training throughput: `dmatrain bench` beside the PyTorch + torch.compile anchor on the same shapes,
# in one run, printing the ratio (absolute figures drift between machines; ratios do not).
#   scripts/bench_train.sh [ANCHORS_DIR] [SHAPES...]
#   SHAPES from: 20m paper-80m paper-200m (default: these three), paper-80m-mla paper-200m-mla
# ANCHORS_DIR holds torch_trainer.py (a copy of ../shared/anchors; default .anchors); the MLA shapes'
# anchor is scripts/anchors/torch_mla_trainer.py (the same trainer with MLA's attention). Needs a
# built build/dmatrain (BUILD to change) and python3 with torch for the anchor (skipped when missing).
set -uo pipefail
cd "$(dirname "$0")/.."
ANCHORS=${1:-.anchors}
shift || true
SHAPES=("$@")
[ ${#SHAPES[@]} -eq 0 ] && SHAPES=(20m paper-80m paper-200m)
BIN=${BUILD:-build}/dmatrain
STEPS=${STEPS:-10}
declare -A BATCH=([20m]=64 [paper-80m]=32 [paper-200m]=16 [paper-80m-mla]=32 [paper-200m-mla]=16)
declare -A ANCHOR_ARGS=(
  [20m]="--d 256 --layers 8 --heads 2 --kv_heads 1 --ffn 768"
  [paper-80m]="--d 768 --layers 12 --heads 6 --kv_heads 3 --ffn 2304"
  [paper-200m]="--d 1024 --layers 16 --heads 8 --kv_heads 4 --ffn 3072"
  [paper-80m-mla]="--d 768 --layers 12 --heads 6 --ffn 2304 --kv_rank 192"
  [paper-200m-mla]="--d 1024 --layers 16 --heads 8 --ffn 3072 --kv_rank 256")
printf "%-11s %12s %8s %12s %8s %7s\n" shape "ours tok/s" "MFU" "torch tok/s" "MFU" ratio
for s in "${SHAPES[@]}"; do
  b=${BATCH[$s]}
  ours=$("$BIN" bench "configs/$s.json" --steps "$STEPS" --set train.batch_size="$b" --set train.grad_accum=1 \
         ${EXTRA_SETS:-} | tail -1)
  echo "$ours" >&2
  anchor='{}'
  trainer="$ANCHORS/torch_trainer.py"
  [[ $s == *-mla ]] && trainer=scripts/anchors/torch_mla_trainer.py
  if [ -f "$trainer" ] && python3 -c "import torch" 2>/dev/null; then
    anchor=$(python3 "$trainer" --vocab 32768 ${ANCHOR_ARGS[$s]} --seq 2048 --batch "$b" 2>/dev/null | tail -1)
    echo "$anchor" >&2
  fi
  python3 - "$s" "$ours" "$anchor" <<'PY'
import json, sys
s, o, a = sys.argv[1], json.loads(sys.argv[2] or "{}"), json.loads(sys.argv[3] or "{}")
ot, at = o.get("tokens_per_s", 0), a.get("tokens_per_s", 0)
print(f"{s:<11} {ot:12.0f} {100*(o.get('mfu') or 0):7.1f}% {at:12.0f} {100*(a.get('mfu') or 0):7.1f}% "
      f"{(ot/at if at else float('nan')):7.3f}")
PY
done
