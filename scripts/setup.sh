#!/usr/bin/env bash
# Installs the Debian packages dmatrain needs (skipping those already installed) and builds it
# into build/ (or DMAT_BUILD_DIR). Idempotent: a second run installs nothing and rebuilds only what changed.
#   bash scripts/setup.sh            # Release build; CUDA backend when nvcc is found
#   DMAT_CMAKE_ARGS="-DDMAT_CUDA=OFF" bash scripts/setup.sh
#   bash scripts/setup.sh dmatrain   # build only the named targets (the quickstart skips the tests)
#   DMAT_BUILD_DIR=build-san DMAT_CMAKE_ARGS="..." bash scripts/setup.sh   # another build (sanitize.sh, fuzz.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

# clang, its sanitizer/libFuzzer runtimes and its OpenMP: the sanitizer and fuzzing build (build-san).
pkgs=(build-essential cmake nlohmann-json3-dev libspdlog-dev libfmt-dev libgtest-dev
      libopenmpi-dev openmpi-bin python3-torch python3-numpy python3-matplotlib
      clang libclang-rt-dev libomp-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# nvcc lives outside PATH on some machines; CMake finds it through CUDACXX.
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi

dir="${DMAT_BUILD_DIR:-build}"
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=Release ${DMAT_CMAKE_ARGS:-} >/dev/null
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$dir" -j "$(nproc)" "${targets[@]}"
echo "setup: $dir/ is up to date"
