#!/usr/bin/env bash
# compute-sanitizer over the attention, DMA and NSA GPU suites (tests/test_gpu_attention.cpp,
# tests/test_gpu_dma.cpp, tests/test_gpu_nsa.cpp): memcheck (out-of-bounds and misaligned device accesses, invalid frees,
# CUDA API errors) and racecheck (shared-memory hazards between threads of a block). On a GPU
# machine, after a CUDA build (scripts/gpu_check.sh builds one). Full logs in OUT_DIR; a summary per
# suite and tool on stdout; exit 1 if any run reported an error, failed a test, or ran without a GPU.
#   scripts/gpu_sanitize.sh [OUT_DIR]
# Environment: BUILD (default build), TOOLS (default "memcheck racecheck"; initcheck and synccheck
# also work), SUITES (default "test_gpu_attention test_gpu_dma test_gpu_nsa"), GTEST_FILTER (default: every
# test), LIMIT_S (seconds per suite and tool, default 3600: a sanitized kernel runs 10-100x slower).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-sanitize}
BUILD=${BUILD:-build}
TOOLS=${TOOLS:-memcheck racecheck}
SUITES=${SUITES:-test_gpu_attention test_gpu_dma test_gpu_nsa}
LIMIT_S=${LIMIT_S:-3600}
mkdir -p "$OUT_DIR"

CS=$(command -v compute-sanitizer || true)
[ -z "$CS" ] && [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ] && CS="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [ -z "$CS" ]; then
  echo "gpu_sanitize: compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
  exit 1
fi
if ! grep -q "^DMAT_CUDA:BOOL=ON" "$BUILD/CMakeCache.txt" 2>/dev/null; then
  echo "gpu_sanitize: $BUILD is not a CUDA build (DMAT_CUDA=ON): run scripts/gpu_check.sh first"
  exit 1
fi
if ! "$BUILD/dmatrain" devices 2>/dev/null | grep -q "^cuda:"; then
  echo "gpu_sanitize: no CUDA device visible: nothing would run on a GPU"
  exit 1
fi
"$CS" --version | tail -1 > "$OUT_DIR/version.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT_DIR/gpu.txt" 2>&1

status=0
printf '%-20s %-10s %6s %8s %-s\n' suite tool exit time_s "sanitizer summary / tests"
for suite in $SUITES; do
  bin="$BUILD/tests/$suite"
  if [ ! -x "$bin" ]; then
    echo "gpu_sanitize: $bin not built"
    status=1
    continue
  fi
  for tool in $TOOLS; do
    log="$OUT_DIR/$suite.$tool.log"
    t0=$(date +%s)
    # 86: the sanitizer found errors; 77: the suite saw no GPU (tests/gpu_test_main.cpp); 124: time limit.
    timeout "$LIMIT_S" "$CS" --tool "$tool" --error-exitcode 86 --print-limit 50 \
      "$bin" ${GTEST_FILTER:+--gtest_filter="$GTEST_FILTER"} > "$log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|SYNCCHECK SUMMARY|INITCHECK SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
    tests=$(grep -E "^\[  (PASSED|FAILED)  \]" "$log" | head -2 | tr '\n' ' ')
    printf '%-20s %-10s %6s %8s %s | %s\n' "$suite" "$tool" "$rc" "$secs" "${summary:-no summary}" "${tests:-no gtest result}"
    [ "$rc" -ne 0 ] && status=1
  done
done
exit $status
