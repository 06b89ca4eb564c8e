#!/usr/bin/env bash
# CI's sanitizer step (.ci/run, after scripts/test.sh): an AddressSanitizer + UndefinedBehaviorSanitizer
# build (clang, CPU only, build-san/) of dmatrain, the cpu and mpi test suites and the fuzz harnesses;
# then the tests below under the sanitizers, then each fuzz target for FUZZ_SECONDS (default 20) on its
# seeds (scripts/fuzz.sh). A sanitizer report fails its test (the build does not recover from one).
#   bash scripts/sanitize.sh           # what CI runs
#   FUZZ_SECONDS=0 bash scripts/sanitize.sh    # tests only
# Budget: the whole of .ci/run stays under ~20 minutes on 2 cores (docs/fuzzing.md has the timings).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"

# The cpu label minus these (the choice the 2-core CI budget forces; everything else of cpu and all of
# mpi runs):
#   IoOracle.TorchOracleSelfTest, Oracle.*, NsaOracle.*, Ladder.Smoke: mostly Python (torch, the ladder
#     launcher); the C++ they drive is exercised by Model.GradientCheck* and Train.* / RunFaults.*.
#   Train.TinyConfigLearnsWellBelowUnigramEntropy, MlaTrain.*, DmaTrain.*, NsaTrain.*,
#   RunFaults.EvalRefusesANonFiniteLoss: long training or evaluation loops (minutes each under ASan);
#     the same layers, optimizer and evaluation run in Model.*, Mla*, Dma*, Nsa*, Train.* and the other
#     RunFaults.*.
EXCLUDE='^(IoOracle\.TorchOracleSelfTest|Oracle\.|NsaOracle\.|Ladder\.Smoke|Train\.TinyConfigLearnsWellBelowUnigramEntropy|MlaTrain\.|DmaTrain\.|NsaTrain\.|RunFaults\.EvalRefusesANonFiniteLoss)'

# Only what runs: the CLI, the non-GPU suites and the harnesses.
targets=(dmatrain fuzzers)
for f in tests/test_*.cpp; do
  t="$(basename "$f" .cpp)"
  case "$t" in test_util | test_gpu_*) ;; *) targets+=("$t") ;; esac
done
# gtest_discover_tests runs each suite while building (to list its tests): the sanitizers' options apply.
export UBSAN_OPTIONS="print_stacktrace=1"
DMAT_BUILD_DIR=build-san \
  DMAT_CMAKE_ARGS="-DCMAKE_CXX_COMPILER=clang++ -DDMAT_CUDA=OFF -DDMAT_FUZZ=ON -DDMAT_TEST_TIMEOUT_SCALE=3" \
  bash scripts/setup.sh "${targets[@]}"
built=$(date +%s)

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
status=0
# cpu: LeakSanitizer on (ASan's default).
ctest --test-dir build-san --output-on-failure -j 2 -L cpu -E "$EXCLUDE" || status=1
# mpi: leak checking off. OpenMPI 4.1 keeps what MPI_Init allocates (ompi_op_base_op_select,
# ompi_comm_set_nb, its dlopen'd components) until exit by design, and unloads the components first,
# so those stacks cannot be suppressed by name; our own code's leaks are checked by the cpu label,
# which runs the same training code in one process.
ASAN_OPTIONS="detect_leaks=0" ctest --test-dir build-san --output-on-failure -j 2 -L mpi || status=1
tested=$(date +%s)

if [ "$FUZZ_SECONDS" -gt 0 ]; then
  bash scripts/fuzz.sh "$FUZZ_SECONDS" || status=1
fi
end=$(date +%s)
echo "sanitize: build $((built - start)) s, tests $((tested - built)) s, fuzzing $((end - tested)) s, total $((end - start)) s"
exit $status
