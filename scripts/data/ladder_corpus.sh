#!/usr/bin/env bash
# ladder_corpus: the token shards of the Chinchilla ladder (configs/ladder/README.md), made on the GPU
# machine from the carried English text and the source trees already there, then checked shard by shard
# against a committed manifest before any training reads them.
#
# Usage: scripts/data/ladder_corpus.sh --dmatrain BIN --english PACK.tar.xz [--out DIR] [--work DIR]
#                                      [--expect MANIFEST | --record MANIFEST] [--threads N] [--python PY]
#   --dmatrain BIN   a built dmatrain (a CPU build will do: tokenizing needs no GPU)
#   --english PACK   english-text.tar.xz from scripts/data/english.sh --pack (carried to the machine)
#   --out DIR        the shards and manifest.json (default /tmp/dmat-data/ladder, the ladder spec's corpus.dir)
#   --work DIR       where the text is unpacked (default /tmp/corpus: the path the committed manifest lists)
#   --expect FILE    the committed manifest the shards must match (default data/manifests/h200-mix-manifest.json)
#   --record FILE    instead of checking, write the new manifest to FILE (a new file; never overwritten)
#   --python PY      the interpreter whose site-packages are a root, and which runs the check (default python3)
# The roots are WORK/text, PY's site-packages, /usr/include and /usr/local/cuda/include, read by
# scripts/data/source.sh (0.5% validation, 100M-token shards, data/tokenizer/dmat-mix-32k.json): the recipe
# of the committed manifest (data/README.md, "Getting 500M training tokens"). Deterministic: the same trees
# and text give the same shards. A DIR that already holds a corpus is checked and kept, never rebuilt or
# overwritten; one that differs from the committed manifest is an error (remove it to rebuild).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

bin="" pack="" out=/tmp/dmat-data/ladder work=/tmp/corpus expect="$repo/data/manifests/h200-mix-manifest.json"
record="" threads=0 py=python3
while [ $# -gt 0 ]; do
  case "$1" in
    --dmatrain) bin="$2"; shift 2 ;;
    --english) pack="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --expect) expect="$2"; shift 2 ;;
    --record) record="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    -h|--help) sed -n '2,21p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "ladder_corpus.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$bin" ] && [ -x "$bin" ] || { echo "ladder_corpus.sh: --dmatrain BIN (a built dmatrain) is required" >&2; exit 2; }
if [ -n "$record" ] && [ -e "$record" ]; then
  echo "ladder_corpus.sh: --record $record exists; it is not overwritten (remove it first if it is stale)" >&2; exit 2
fi
if [ -z "$record" ] && [ ! -f "$expect" ]; then
  echo "ladder_corpus.sh: the committed manifest $expect does not exist (pass --expect FILE, or --record FILE the first time)" >&2
  exit 2
fi
check() {
  if [ -n "$record" ]; then
    "$py" "$repo/scripts/ladder.py" check-corpus "$out/manifest.json" --record "$record"
  else
    "$py" "$repo/scripts/ladder.py" check-corpus "$out/manifest.json" --expect "$expect"
  fi
}

start=$(date +%s)
if [ -f "$out/manifest.json" ]; then
  echo "ladder_corpus.sh: $out already holds a corpus; checking it (remove $out to rebuild)"
  check
  exit 0
fi

[ -n "$pack" ] && [ -f "$pack" ] || {
  echo "ladder_corpus.sh: --english PACK.tar.xz is required (scripts/data/english.sh --pack makes it)" >&2; exit 2; }
mkdir -p "$work"
tar -C "$work" -xJf "$pack"
[ -f "$work/SHA256SUMS" ] || { echo "ladder_corpus.sh: $pack holds no SHA256SUMS: not an english.sh pack" >&2; exit 1; }
# SHA256SUMS names the files relative to the pack (packs made before that fix: where english.sh
# wrote them); check each by its name under WORK/text, which works for both.
while read -r sum path; do
  printf '%s  %s\n' "$sum" "$work/text/$(basename "$path")"
done < "$work/SHA256SUMS" | sha256sum -c --quiet - || {
  echo "ladder_corpus.sh: the English text in $work/text does not match its SHA256SUMS" >&2; exit 1; }

site=$("$py" -c 'import site; print(" ".join(site.getsitepackages()))')
roots=("$work/text")
for r in $site /usr/include /usr/local/cuda/include; do
  if [ -d "$r" ]; then roots+=("$r"); else echo "ladder_corpus.sh: note: $r does not exist here; skipped"; fi
done
echo "ladder_corpus.sh: roots ${roots[*]}"
mkdir -p "$(dirname "$out")"
"$repo/scripts/data/source.sh" --dmatrain "$bin" --tokenizer "$repo/data/tokenizer/dmat-mix-32k.json" \
  --out "$out" --threads "$threads" "${roots[@]}" > "$out.log" 2>&1 || {
  tail -20 "$out.log"; echo "ladder_corpus.sh: source.sh failed (log $out.log)" >&2; exit 1; }
grep "^prepared" "$out.log" || true
check
echo "ladder_corpus.sh: done in $(( $(date +%s) - start )) s"
