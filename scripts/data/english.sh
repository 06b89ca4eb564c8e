#!/usr/bin/env bash
# english: English prose from Debian packages, as plain-text files for `dmatrain data prepare`.
#
# Usage: scripts/data/english.sh [OUT_DIR] [--pack]      (default OUT_DIR: build/corpus/english)
# Writes OUT_DIR/text/<source>.txt (UTF-8, documents separated by two blank lines), OUT_DIR/SOURCES.tsv
# (source, Debian packages with versions, bytes, documents) and, with --pack, OUT_DIR/english-text.tar.xz
# (the text compressed for the trip to the GPU machine: see "Getting 500M training tokens onto the GPU
# machine" in data/README.md).
# Installs the packages it needs with apt-get when they are missing (needs root then); markup is
# stripped by scripts/data/english_extract.py (python3 stdlib). Same package versions, same bytes.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$repo/build/corpus/english"
pack=0
for a in "$@"; do
  case "$a" in
    --pack) pack=1 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "english.sh: unknown option $a" >&2; exit 2 ;;
    *) out="$a" ;;
  esac
done

# source name -> the Debian packages it reads (bible-kjv prints the text of bible-kjv-text).
declare -A pkgs=(
  [gcide]="dict-gcide" [foldoc]="dict-foldoc" [devil]="dict-devil" [wordnet]="wordnet-base"
  [kjv]="bible-kjv bible-kjv-text" [perldoc]="perl-doc" [pythondoc]="python3.11-doc"
  [linuxdoc]="linux-doc-6.1" [manpages]="manpages manpages-dev glibc-doc" [info]="gnu-standards bash-doc"
  [debref]="debian-reference-en" [jargon]="jargon-text" [fortunes]="fortune-mod fortunes fortunes-min"
)
order=(gcide wordnet foldoc devil kjv jargon fortunes perldoc pythondoc linuxdoc manpages info debref)

need=()
for s in "${order[@]}"; do
  for p in ${pkgs[$s]}; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
  done
done
if [ ${#need[@]} -gt 0 ]; then
  echo "english.sh: installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
command -v man >/dev/null && command -v col >/dev/null && command -v pod2text >/dev/null || {
  echo "english.sh: needs man, col (bsdextrautils) and pod2text (perl)" >&2; exit 1; }

mkdir -p "$out/text"
python3 "$repo/scripts/data/english_extract.py" "$out/text" "${order[@]}"

{
  printf 'source\tpackages\tbytes\tdocuments\n'
  for s in "${order[@]}"; do
    f="$out/text/$s.txt"
    vers=$(for p in ${pkgs[$s]}; do dpkg-query -W -f='${Package}=${Version} ' "$p"; done)
    # documents are separated by two blank lines: count the separators + 1
    docs=$(python3 -c "import sys; t=open(sys.argv[1],encoding='utf-8').read(); print(t.count('\n\n\n')+1 if t else 0)" "$f")
    printf '%s\t%s\t%s\t%s\n' "$s" "${vers% }" "$(wc -c < "$f")" "$docs"
  done
} > "$out/SOURCES.tsv"
column -t -s $'\t' "$out/SOURCES.tsv" 2>/dev/null || cat "$out/SOURCES.tsv"
echo "total bytes: $(cat "$out"/text/*.txt | wc -c)"
# paths relative to the pack's root, so `cd DIR && sha256sum -c SHA256SUMS` checks it after unpacking
(cd "$out" && sha256sum text/*.txt > SHA256SUMS)

if [ "$pack" = 1 ]; then
  tar -C "$out" -cf - text SOURCES.tsv SHA256SUMS | xz -9e -T2 > "$out/english-text.tar.xz.tmp"
  mv "$out/english-text.tar.xz.tmp" "$out/english-text.tar.xz"
  echo "packed: $(wc -c < "$out/english-text.tar.xz") bytes in $out/english-text.tar.xz"
fi
