#!/usr/bin/env bash
# The main job: build, prepare the bundled corpus (byte-level tokens), train configs/tiny.json,
# and print the validation perplexity. Runs on the CPU when there is no GPU (a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dmatrain
if [ ! -f build/data/english/manifest.json ]; then
  build/dmatrain data prepare --tokenizer byte --val-fraction 0.03 --out build/data/english data/english
fi
run="runs/tiny-$(date +%Y%m%d-%H%M%S)"
build/dmatrain train configs/tiny.json --out "$run" "$@"
