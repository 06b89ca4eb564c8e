#!/usr/bin/env bash
# Builds (through setup.sh) and runs the test suites that need no GPU: ctest labels cpu and mpi.
#   bash scripts/test.sh             # what CI runs
#   bash scripts/test.sh -L gpu      # other ctest arguments replace the label selection
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# OpenMPI refuses to run as root unless told; tests launch mpirun themselves.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# ctest runs two suites at once and each uses OpenMP: sleeping (not spinning) waiters keep
# oversubscribed cores from stalling each other's barriers.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [ $# -eq 0 ]; then set -- -L "cpu|mpi"; fi
ctest --test-dir build --output-on-failure -j 2 "$@"
