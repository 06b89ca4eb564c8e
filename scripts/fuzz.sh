#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz; clang, ASan + UBSan) into build-san/ and runs each
# target for a bounded time on its committed seeds (tests/fuzz/corpus/<target>/) plus the inputs
# earlier runs found (build-san/fuzz/<target>/corpus/), then prints per target: executions,
# coverage (libFuzzer's cov: edges, ft: features), corpus size and findings. docs/fuzzing.md.
#   bash scripts/fuzz.sh                      # 60 s per target, every target
#   bash scripts/fuzz.sh 300 config shard     # 300 s per named target
# A finding (crash, sanitizer report, uncaught non-dmat exception, broken property, > 10 s for one
# input, > 2 GB rss) leaves its input in build-san/fuzz/<target>/findings/; exit 1 if any target found one.
# Reproduce one: build-san/tests/fuzz/fuzz_<target> FILE
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
[ $# -gt 0 ] && shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in tests/fuzz/fuzz_*.cpp; do t="${f##*/fuzz_}"; targets+=("${t%.cpp}"); done
fi

bins=()
for t in "${targets[@]}"; do bins+=("fuzz_$t"); done
DMAT_BUILD_DIR=build-san DMAT_CMAKE_ARGS="-DCMAKE_CXX_COMPILER=clang++ -DDMAT_CUDA=OFF -DDMAT_FUZZ=ON ${DMAT_CMAKE_ARGS:-}" \
  bash scripts/setup.sh "${bins[@]}" >/dev/null

# Inputs are written to files (the readers take paths): in memory when /dev/shm is there, in a folder
# removed at the end (libFuzzer ends a run without the harnesses' exit handlers).
base="${TMPDIR:-/tmp}"
[ -d /dev/shm ] && [ -w /dev/shm ] && base=/dev/shm
TMPDIR="$(mktemp -d "$base/dmat_fuzz.XXXXXX")"
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT
# Leaks count as findings too (LeakSanitizer runs after each input that leaked).
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1}"
status=0
summary=()
for t in "${targets[@]}"; do
  work="build-san/fuzz/$t"
  mkdir -p "$work/corpus" "$work/findings"
  dict=()
  [ "$t" != shard ] && dict=(-dict=tests/fuzz/json.dict)  # every other format is JSON or holds some
  set +e
  # The first corpus directory receives new inputs; the committed seeds are only read.
  "build-san/tests/fuzz/fuzz_$t" "$work/corpus" "tests/fuzz/corpus/$t" -max_total_time="$secs" -timeout=10 \
    -max_len=16384 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/findings/" "${dict[@]}" \
    >"$work/log" 2>&1
  rc=$?
  set -e
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$work/log" | tail -1 | grep -o '[0-9]*$' || true)
  last=$(grep -E '^#[0-9]+[[:space:]]' "$work/log" | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  corp=$(grep -o 'corp: [0-9]*' <<<"$last" | grep -o '[0-9]*' || true)
  found=$(ls "$work/findings" | wc -l)
  if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
    status=1
    echo "fuzz: $t: FINDING (exit $rc): $(ls "$work/findings" | tr '\n' ' ')"
    grep -E 'ERROR: |runtime error|fuzz finding|terminate called|SUMMARY' "$work/log" | head -5 | sed 's/^/  /'
    echo "  full log: $work/log"
  fi
  summary+=("$(printf '%-12s %6ss %12s %7s %7s %7s %8s' "$t" "$secs" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$found")")
done
printf '%-12s %7s %12s %7s %7s %7s %8s\n' target time executions cov ft corpus findings
printf '%s\n' "${summary[@]}"
exit $status
