#!/usr/bin/env bash
# ladder_gpu: one time-boxed call of the Chinchilla ladder on the GPU machine (configs/ladder/README.md):
# build dmatrain (a no-op when it is up to date), make and check the corpus when it is not there yet,
# run the ladder in the minutes left, gather runs.csv, and copy the results to OUT_DIR so they can be
# committed. Safe to repeat: finished runs are skipped, partial ones resume (while the machine is warm).
#
# Usage: scripts/ladder_gpu.sh [--minutes M] [--english PACK] [--out OUT_DIR] [--parallel K] [--commit HASH]
#                              [-- extra arguments of scripts/ladder.py run]
#   --minutes M     the whole call's budget, build and corpus included (default 9: calls are cut at 10)
#   --english PACK  english-text.tar.xz (default build/corpus/english/english-text.tar.xz); needed only
#                   when the corpus is not on the machine yet
#   --out OUT_DIR   where docs/results/ladder is copied (default $OUT, when set)
#   --parallel K    runs at once, one GPU each (default: every visible GPU)
#   --commit HASH   the commit recorded with each run (the machine's copy of the tree may have no .git)
# Environment: BUILD (default build), PY (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
minutes=9 pack=build/corpus/english/english-text.tar.xz out="${OUT:-}" parallel="" commit=()
BUILD=${BUILD:-build}
PY=${PY:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    --english) pack="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --parallel) parallel="$2"; shift 2 ;;
    --commit) commit=(--commit "$2"); shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "ladder_gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$parallel" ]; then
  parallel=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$parallel" -ge 1 ] || { echo "ladder_gpu.sh: no GPU visible (nvidia-smi -L); pass --parallel 1 to run anyway" >&2; exit 1; }
fi

mkdir -p "$BUILD"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release > "$BUILD/ladder-cmake.log" 2>&1 || {
    tail -30 "$BUILD/ladder-cmake.log"; exit 1; }
fi
cmake --build "$BUILD" -j"$(nproc)" --target dmatrain > "$BUILD/ladder-build.log" 2>&1 || {
  grep -E "error" "$BUILD/ladder-build.log" | head -30; exit 1; }
echo "ladder_gpu.sh: dmatrain built ($(( $(date +%s) - start )) s)"

scripts/data/ladder_corpus.sh --dmatrain "$BUILD/dmatrain" --english "$pack" --python "$PY"

left=$("$PY" -c "print(round($minutes - ($(date +%s) - $start) / 60 - 0.5, 2))")
echo "ladder_gpu.sh: $left minutes left for training, $parallel run(s) at a time"
rc=0
"$PY" scripts/ladder.py run --dmatrain "$BUILD/dmatrain" --max-minutes "$left" --parallel "$parallel" \
  ${commit[@]+"${commit[@]}"} "$@" || rc=$?
"$PY" scripts/ladder.py gather
if [ -n "$out" ]; then
  mkdir -p "$out/ladder"
  cp -r docs/results/ladder/. "$out/ladder/"
  echo "ladder_gpu.sh: results copied to $out/ladder (commit them into docs/results/ladder)"
fi
exit $rc
