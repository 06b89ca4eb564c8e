#!/usr/bin/env bash
# Build on a GPU machine and run the gpu-label tests (and optionally the cpu label), logging to
# OUT_DIR. What the H200 sessions run; CI (no GPU) runs scripts/test.sh instead.
#   scripts/gpu_check.sh [OUT_DIR] [extra ctest -R regex]
# Environment: BUILD (default build), JOBS (default: all cores), LABELS (default gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check}
REGEX=${2:-}
BUILD=${BUILD:-build}
JOBS=${JOBS:-$(nproc)}
LABELS=${LABELS:-gpu}
mkdir -p "$OUT_DIR"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_WAIT_POLICY=PASSIVE
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT_DIR/gpu.txt" 2>&1
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release > "$OUT_DIR/cmake.log" 2>&1 || { tail -30 "$OUT_DIR/cmake.log"; exit 1; }
fi
if ! cmake --build "$BUILD" -j"$JOBS" > "$OUT_DIR/build.log" 2>&1; then
  grep -E "error|Error" "$OUT_DIR/build.log" | head -40
  exit 1
fi
# A GPU check that used no GPU must fail, not pass with every test skipped: the build must have the
# CUDA backend and see a device (ctest reports gpu tests that ran without one as skipped).
if ! grep -q "^DMAT_CUDA:BOOL=ON" "$BUILD/CMakeCache.txt"; then
  echo "gpu_check: $BUILD was configured with DMAT_CUDA=OFF: no GPU code to check" | tee "$OUT_DIR/ctest.log"
  exit 1
fi
if ! "$BUILD/dmatrain" devices > "$OUT_DIR/devices.txt" 2>&1 || ! grep -q "^cuda:" "$OUT_DIR/devices.txt"; then
  echo "gpu_check: no CUDA device visible ($(head -1 "$OUT_DIR/devices.txt")): nothing would run on a GPU" | tee "$OUT_DIR/ctest.log"
  exit 1
fi
# Register / spill report of the CUDA kernels (ptxas -v), for docs/perf-log.md.
grep -E "ptxas info|bytes stack frame|spill" "$OUT_DIR/build.log" > "$OUT_DIR/ptxas.txt" || true
ARGS=(-L "$LABELS" --output-on-failure --timeout 900)
[ -n "$REGEX" ] && ARGS+=(-R "$REGEX")
(cd "$BUILD" && ctest "${ARGS[@]}" -j4) > "$OUT_DIR/ctest.log" 2>&1
rc=$?
grep -E "tests passed|tests failed|\*\*\*Failed|Failed|Passed .* sec|Skipped" "$OUT_DIR/ctest.log" | tail -60
exit $rc
