#!/usr/bin/env bash
# The 32768-token byte-level BPE trained on the corpus mix: the english recipe's text plus source trees
# (the same files the source recipe reads). Needs only bash and a built dmatrain.
#
# Usage: scripts/data/mix_tokenizer.sh --dmatrain BIN --out TOKENIZER.json [--vocab N] ENGLISH_TEXT_DIR SOURCE_ROOT...
# Pre-tokenizer: LLaMA-3's regex; special tokens: <|endoftext|> (ends every document). Deterministic:
# the same files give the same tokenizer.json.
set -euo pipefail
bin="" out="" vocab=32768
ins=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dmatrain) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --vocab) vocab="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "mix_tokenizer.sh: unknown option $1" >&2; exit 2 ;;
    *) ins+=("$1"); shift ;;
  esac
done
[ -n "$bin" ] && [ -x "$bin" ] || { echo "mix_tokenizer.sh: --dmatrain BIN is required" >&2; exit 2; }
[ -n "$out" ] || { echo "mix_tokenizer.sh: --out TOKENIZER.json is required" >&2; exit 2; }
[ ${#ins[@]} -ge 1 ] || { echo "mix_tokenizer.sh: give the english text directory and source roots" >&2; exit 2; }
# The source recipe's file selection (scripts/data/source.sh); the english .txt files match '*.txt'.
select=()
for g in '*.py' '*.pyi' '*.md' '*.rst' '*.txt' '*.c' '*.h' '*.cc' '*.cpp' '*.hpp' '*.cu' '*.cuh'; do select+=(--include "$g"); done
for g in '__pycache__' '.git' 'node_modules' '*.dist-info' '*.egg-info' 'LICENSE*' 'LICENCE*' 'COPYING*' \
         '*.min.*' 'vocab*.txt' '*merges*.txt' 'requirements*.txt' 'top_level.txt' 'SOURCES.txt' 'entry_points.txt'; do
  select+=(--exclude "$g")
done
"$bin" tokenizer train --vocab "$vocab" --pretokenizer llama3 --special '<|endoftext|>' --out "$out" "${select[@]}" "${ins[@]}"
"$bin" tokenizer info "$out"
