#!/usr/bin/env bash
# Data-parallel throughput: `dmatrain train` on 1 GPU, then on each N of RANKS with plain DDP and
# with ZeRO-1, on the same per-GPU micro-batch; prints tokens/s (all GPUs and per GPU), the ratio
# per GPU against one GPU, and each GPU's peak memory (nvidia-smi, CUDA context included).
#   scripts/bench_ddp.sh [RANKS...]            (default: 2; e.g. 2 4)
# Environment: CONFIG (default configs/paper-80m.json), BATCH (per-GPU micro-batch, default 16),
# STEPS (default 60; tokens/s is the mean of the log lines after the first LOG steps), LOG (default
# 20), EXTRA (more --set options; e.g. "--set run.device=cpu --set run.threads=1" for a CPU smoke
# run), BUILD (default build), OUT (work directory, default a new temporary one). The bundled corpus
# (byte tokens) is prepared under OUT: the speed does not depend on the text.
set -uo pipefail
cd "$(dirname "$0")/.."
RANKS=("$@")
[ ${#RANKS[@]} -eq 0 ] && RANKS=(2)
BIN=${BUILD:-build}/dmatrain
CONFIG=${CONFIG:-configs/paper-80m.json}
BATCH=${BATCH:-16}
STEPS=${STEPS:-60}
LOG=${LOG:-20}
OUT=${OUT:-$(mktemp -d /tmp/bench_ddp.XXXXXX)}
MPI="mpirun --allow-run-as-root --bind-to none"
[ -x "$BIN" ] || { echo "bench_ddp: $BIN not found (build first: bash scripts/setup.sh dmatrain)" >&2; exit 2; }
command -v mpirun > /dev/null || { echo "bench_ddp: mpirun not found" >&2; exit 2; }
mkdir -p "$OUT"
[ -f "$OUT/data/manifest.json" ] ||
  "$BIN" data prepare --tokenizer byte --val-fraction 0.03 --out "$OUT/data" data/english > "$OUT/prepare.log" 2>&1 ||
  { echo "bench_ddp: data prepare failed ($OUT/prepare.log)" >&2; exit 1; }
ARGS="$CONFIG --set data.train=$OUT/data/train --set data.val=$OUT/data/val --set train.batch_size=$BATCH
      --set train.grad_accum=1 --set train.steps=$STEPS --set run.log_interval=$LOG --set train.eval_interval=0
      --set train.eval_batches=1 --set train.checkpoint_interval=0 ${EXTRA:-}"

# run TAG NP ZERO: one training run; prints "tokens/s peak_MiB_per_GPU" (tokens/s: mean over the
# step lines after the first logged one, which includes start-up)
run() {
  local tag=$1 np=$2 zero=$3 sm=""
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/mem_$tag.csv" 2> /dev/null &
    sm=$!
  fi
  local launch=""
  [ "$np" -gt 1 ] && launch="$MPI -np $np"
  # shellcheck disable=SC2086
  $launch "$BIN" train $ARGS --set train.zero="$zero" --out "$OUT/run_$tag" > "$OUT/train_$tag.log" 2>&1
  local rc=$?
  [ -n "$sm" ] && kill "$sm" 2> /dev/null && wait "$sm" 2> /dev/null
  [ $rc -eq 0 ] || { echo "bench_ddp: run $tag failed (rc $rc, $OUT/train_$tag.log)" >&2; echo "nan nan"; return; }
  python3 - "$OUT/train_$tag.log" "$OUT/mem_$tag.csv" << 'PY'
import re, sys, os
rates = []
for line in open(sys.argv[1]):
    m = re.search(r"step (\d+)/\d+ \| loss .*?\| ([\d.]+)([KM]?) tok/s", line)
    if m:
        rates.append(float(m.group(2)) * {"": 1, "K": 1e3, "M": 1e6}[m.group(3)])
rates = rates[1:] or rates
peak = {}
if os.path.exists(sys.argv[2]):
    for l in open(sys.argv[2]):
        p = l.split(",")
        if len(p) == 2 and p[1].strip().isdigit():
            peak[int(p[0])] = max(peak.get(int(p[0]), 0), int(p[1]))
used = [v for v in peak.values() if v > 100]
print(f"{sum(rates) / len(rates) if rates else float('nan'):.0f} {max(used) if used else 'n/a'}")
PY
}

printf "%-6s %-5s %14s %14s %8s %14s\n" GPUs ZeRO "tokens/s" "per GPU" "/ 1 GPU" "peak MiB/GPU"
read -r base mem < <(run g1 1 0)
printf "%-6s %-5s %14s %14s %8s %14s\n" 1 - "$base" "$base" 1.00 "$mem"
for n in "${RANKS[@]}"; do
  for z in 0 1; do
    read -r tps mem < <(run "g${n}z$z" "$n" "$z")
    python3 -c "
import sys; n, z, t, b, m = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
print(f'{n:<6} {z:<5} {t:14.0f} {t / n:14.0f} {t / n / b:8.3f} {m:>14}')" "$n" "$z" "$tps" "$base" "$mem"
  done
done
echo "(logs and runs in $OUT)"
