#!/usr/bin/env bash
# english_more: further English documentation from Debian packages (step 3 of "Getting 500M training
# tokens onto the GPU machine" in data/README.md), deduplicated against the english recipe and packed
# into numbered xz parts small enough for one transfer each.
#
# Usage: scripts/data/english_more.sh [OUT_DIR] [--english TEXT_DIR] [--part-mib N] [--jobs N]
#   OUT_DIR      default build/corpus/english-more
#   --english    the english recipe's text directory, for deduplication (default: OUT_DIR/../english/text;
#                made with scripts/data/english.sh when missing)
#   --part-mib   largest part in MiB (default 56: a part + the 6.5 MiB working tree + a 2 MiB dmatrain
#                binary stay under the GPU machine's 64 MiB per call)
#   --jobs       extraction and xz threads (default 2)
# Writes OUT_DIR/debs (the .deb files, fetched with `apt-get download`: unpacked with dpkg-deb -x under
# OUT_DIR/root/<package>, not installed, so none of their dependencies (JDK, GHC, webkit...) come in),
# OUT_DIR/extracted/<package>.txt (markup stripped, code blocks dropped, prose filter: english_extract.py
# --more), OUT_DIR/text/<package>-NNN.txt (documents of the english recipe or of an earlier package
# dropped, files of at most 16 MB), OUT_DIR/english-more-part-NN.tar.xz and OUT_DIR/english-more.json
# (packages with versions and bytes, parts with files, bytes and sha256; copy it to
# data/manifests/english-more.json). Each part unpacks to english-more/text/*.txt + english-more/part-NN.tsv.
# Steps whose output exists are skipped (delete OUT_DIR to start over). Same package versions, same bytes.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$repo/build/corpus/english-more"
english="" part_mib=56 jobs=2
while [ $# -gt 0 ]; do
  case "$1" in
    --english) english="$2"; shift 2 ;;
    --part-mib) part_mib="$2"; shift 2 ;;
    --jobs) jobs="$2"; shift 2 ;;
    -h|--help) sed -n '2,23p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "english_more.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
[ -n "$english" ] || english="$(dirname "$out")/english/text"
extract="$repo/scripts/data/english_extract.py"
mapfile -t pkgs < <(python3 -c "import sys; sys.path.insert(0, sys.argv[1]); import english_extract as e; print('\n'.join(e.MORE))" "$repo/scripts/data")

# 0. the english recipe's text (deduplication reference)
if [ ! -d "$english" ]; then
  "$repo/scripts/data/english.sh" "$(dirname "$english")"
fi

# 1. fetch and unpack the packages (the candidate version of each; apt-get update once if one is missing)
mkdir -p "$out/debs" "$out/root"
missing=()
for p in "${pkgs[@]}"; do
  ls "$out/debs/${p}_"*.deb >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "english_more.sh: downloading ${missing[*]}"
  apt-get update -qq
  (cd "$out/debs" && apt-get download "${missing[@]}" 2>&1 | grep -v -e '^Get:' -e 'unsandboxed' || true)
fi
for p in "${pkgs[@]}"; do
  [ -e "$out/root/$p/.unpacked" ] && continue
  deb=$(ls "$out/debs/${p}_"*.deb | sort -V | tail -1)
  rm -rf "$out/root/$p" && mkdir -p "$out/root/$p"
  dpkg-deb -x "$deb" "$out/root/$p" && touch "$out/root/$p/.unpacked"
done

# 2. extract (markup stripped, code dropped, prose filter)
todo=()
for p in "${pkgs[@]}"; do [ -e "$out/extracted/$p.txt" ] || todo+=("$p"); done
if [ ${#todo[@]} -gt 0 ]; then
  nice -n 10 python3 "$extract" --more "$out/root" "$out/extracted" "$jobs" "${todo[@]}" | tee -a "$out/extract.log"
fi

# 3. deduplicate against the english recipe and across packages (in MORE's order), cut into 16 MB files
if [ ! -e "$out/dedup.tsv" ]; then
  rm -rf "$out/text"
  python3 "$extract" --dedup "$english" "$out/extracted" "$out/text" 16000000 "${pkgs[@]}" > "$out/dedup.tsv.tmp"
  mv "$out/dedup.tsv.tmp" "$out/dedup.tsv"
fi

# 4. parts: files in sorted order, a part closed before it would pass the limit. The size of a file
# compressed is estimated as 0.82 x its xz -2 size (xz -9e is 0.80 x xz -2 on this text, 7x slower;
# cached in est.tsv); a part that still comes out too large gives its last file to the next part and is
# compressed again.
limit=$((part_mib * 1024 * 1024))
touch "$out/est.tsv"
for f in $(cd "$out/text" && ls *.txt | sort); do
  grep -q "^$f	" "$out/est.tsv" || printf '%s\t%s\n' "$f" "$(( $(nice -n 10 xz -2 -T1 -c "$out/text/$f" | wc -c) * 82 / 100 ))" >> "$out/est.tsv"
done
mapfile -t files < <(cd "$out/text" && ls *.txt | sort)
pack() {  # pack NN FILE...: english-more-part-NN.tar.xz, deterministic
  local nn="$1"; shift
  local stage="$out/stage-$nn"
  rm -rf "$stage" && mkdir -p "$stage/english-more/text"
  for f in "$@"; do ln "$out/text/$f" "$stage/english-more/text/$f" 2>/dev/null || cp "$out/text/$f" "$stage/english-more/text/$f"; done
  (cd "$stage/english-more" && sha256sum text/*.txt > "part-$nn.tsv")
  tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 --mode='u=rwX,go=rX' \
      --format=gnu -cf - english-more | nice -n 10 xz -9e -T"$jobs" --block-size=64MiB > "$out/english-more-part-$nn.tar.xz.tmp"
  mv "$out/english-more-part-$nn.tar.xz.tmp" "$out/english-more-part-$nn.tar.xz"
  rm -rf "$stage"
}
rm -f "$out"/english-more-part-*.tar.xz "$out/parts.tsv"
i=0 n=1
while [ $i -lt ${#files[@]} ]; do
  cur=() sum=0
  while [ $i -lt ${#files[@]} ]; do
    e=$(awk -F'\t' -v f="${files[$i]}" '$1==f{print $2}' "$out/est.tsv")
    [ ${#cur[@]} -gt 0 ] && [ $((sum + e)) -gt $((limit * 98 / 100)) ] && break
    cur+=("${files[$i]}"); sum=$((sum + e)); i=$((i + 1))
  done
  nn=$(printf '%02d' $n)
  while :; do
    pack "$nn" "${cur[@]}"
    size=$(wc -c < "$out/english-more-part-$nn.tar.xz")
    [ "$size" -le "$limit" ] && break
    [ ${#cur[@]} -gt 1 ] || { echo "english_more.sh: ${cur[0]} alone is over $part_mib MiB compressed" >&2; exit 1; }
    echo "english_more.sh: part $nn is $size bytes, over $limit: moving ${cur[-1]} to the next part"
    unset 'cur[-1]'; i=$((i - 1))
  done
  printf '%s\t%s\t%s\t%s\n' "english-more-part-$nn.tar.xz" "$size" \
    "$(sha256sum < "$out/english-more-part-$nn.tar.xz" | cut -d' ' -f1)" "${cur[*]}" >> "$out/parts.tsv"
  echo "part $nn: $size bytes, ${#cur[@]} files"
  n=$((n + 1))
done

# 5. manifest
python3 - "$out" "${pkgs[@]}" <<'EOF'
import json, os, re, subprocess, sys
out, pkgs = sys.argv[1], sys.argv[2:]
dedup = {l.split('\t')[0]: l.rstrip('\n').split('\t')[1:] for l in open(os.path.join(out, 'dedup.tsv'))}
raw = {}
for l in open(os.path.join(out, 'extract.log')):
    m = re.match(r'^(\S+): (\d+) files, (\d+) bytes of text, (\d+) kept', l)
    if m:
        raw[m.group(1)] = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
packages = []
for p in pkgs:
    deb = sorted(f for f in os.listdir(os.path.join(out, 'debs')) if f.startswith(p + '_'))[-1]
    ver = subprocess.run(['dpkg-deb', '-f', os.path.join(out, 'debs', deb), 'Version'], capture_output=True,
                         text=True).stdout.strip()
    files, text, kept = raw.get(p, (None, None, None))
    docs, dups, nbytes = (int(x) for x in dedup[p])
    packages.append({'package': p, 'version': ver, 'files': files, 'text_bytes': text, 'prose_bytes': kept,
                     'documents': docs, 'duplicates_dropped': dups, 'bytes': nbytes})
parts = []
for l in open(os.path.join(out, 'parts.tsv')):
    name, size, sha, files = l.rstrip('\n').split('\t')
    files = files.split()
    parts.append({'name': name, 'bytes': int(size), 'sha256': sha,
                  'text_bytes': sum(os.path.getsize(os.path.join(out, 'text', f)) for f in files), 'files': files})
m = {'recipe': 'scripts/data/english_more.sh', 'unpacks_to': 'english-more/text/<package>-NNN.txt',
     'packages': packages, 'total_bytes': sum(p['bytes'] for p in packages),
     'total_documents': sum(p['documents'] for p in packages), 'parts': parts}
json.dump(m, open(os.path.join(out, 'english-more.json'), 'w'), indent=1)
print(f"total: {m['total_documents']} documents, {m['total_bytes']} bytes in {len(parts)} parts "
      f"({sum(p['bytes'] for p in parts)} bytes compressed)")
EOF
echo "manifest: $out/english-more.json (copy to data/manifests/english-more.json)"
