#!/usr/bin/env bash
# source: source code and documentation from local directory trees (for example a Python installation's
# site-packages, CUDA or system headers), tokenized where the files already are: the GPU machine, which
# cannot receive large transfers. Needs only bash and a built dmatrain.
#
# Usage: scripts/data/source.sh --dmatrain BIN --tokenizer T.json --out DIR [--threads N] [--overwrite]
#                               [--train-tokenizer VOCAB] ROOT...
# Reads, under each ROOT, files named *.py *.pyi *.md *.rst *.txt *.c *.h *.cc *.cpp *.hpp *.cu *.cuh
# (source files are one document each; .md/.rst/.txt split at two blank lines), skipping __pycache__,
# .git, node_modules, *.dist-info/*.egg-info metadata, tests' data, licences, minified files and token
# lists (vocab*.txt, *merges*.txt); drops exact duplicates; writes DIR/train, DIR/val (0.5% of documents)
# and DIR/manifest.json (documents, bytes and tokens per ROOT and in total), then describes DIR.
# --train-tokenizer VOCAB: first train a VOCAB-token tokenizer on the same files into T.json (refused if
# T.json exists), instead of reading an existing one.
set -euo pipefail

bin="" tok="" out="" threads=0 overwrite=() train_vocab=""
roots=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dmatrain) bin="$2"; shift 2 ;;
    --tokenizer) tok="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --overwrite) overwrite=(--overwrite); shift ;;
    --train-tokenizer) train_vocab="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "source.sh: unknown option $1" >&2; exit 2 ;;
    *) roots+=("$1"); shift ;;
  esac
done
[ -n "$bin" ] && [ -x "$bin" ] || { echo "source.sh: --dmatrain BIN (the built dmatrain) is required" >&2; exit 2; }
[ -n "$tok" ] || { echo "source.sh: --tokenizer T.json is required" >&2; exit 2; }
[ -n "$out" ] || { echo "source.sh: --out DIR is required" >&2; exit 2; }
[ ${#roots[@]} -gt 0 ] || { echo "source.sh: give at least one ROOT directory" >&2; exit 2; }

select=()
for g in '*.py' '*.pyi' '*.md' '*.rst' '*.txt' '*.c' '*.h' '*.cc' '*.cpp' '*.hpp' '*.cu' '*.cuh'; do
  select+=(--include "$g")
done
for g in '__pycache__' '.git' 'node_modules' '*.dist-info' '*.egg-info' 'LICENSE*' 'LICENCE*' 'COPYING*' \
         '*.min.*' 'vocab*.txt' '*merges*.txt' 'requirements*.txt' 'top_level.txt' 'SOURCES.txt' 'entry_points.txt'; do
  select+=(--exclude "$g")
done

if [ -n "$train_vocab" ]; then
  "$bin" tokenizer train --vocab "$train_vocab" --out "$tok" --threads "$threads" "${select[@]}" "${roots[@]}"
fi
"$bin" data prepare --tokenizer "$tok" --out "$out" --val-fraction 0.005 --shard-tokens 100000000 \
  --threads "$threads" "${overwrite[@]}" "${select[@]}" "${roots[@]}"
"$bin" data inspect "$out"
