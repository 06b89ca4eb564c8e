#!/usr/bin/env bash
# Rebuilds data/english/ (the bundled corpus) from two public-domain texts shipped by Debian:
#   bible-kjv (+ bible-kjv-text)  King James Version, printed chapter by chapter by its `bible` program
#   dict-devil                    Ambrose Bierce, "The Devil's Dictionary" (dictd database)
# Output: plain UTF-8/ASCII text, one document per chapter / dictionary entry, documents separated
# by two blank lines (the rule `dmatrain data prepare` splits text files on).
# Usage: scripts/data/make_bundled_corpus.sh [OUT_DIR]   (default: data/english beside this repo)
# Needs root (or the packages already installed) and python3 (stdlib only).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-$repo/data/english}"

need=()
command -v bible >/dev/null || need+=(bible-kjv bible-kjv-text)
[ -f /usr/share/dictd/devil.dict.dz ] || need+=(dict-devil)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
dpkg-query -W -f='${Package} ${Version}\n' bible-kjv bible-kjv-text dict-devil

mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# The KJV books kept: the narrative, wisdom and gospel books, leaving out long genealogies, census
# lists and ritual law (Leviticus, Numbers, Chronicles, ...) and most prophets, to stay near 2 MB.
books=("Genesis" "Exodus" "Joshua" "Judges" "Ruth" "1 Samuel" "2 Samuel" "1 Kings" "2 Kings" "Esther"
       "Job" "Psalms" "Proverbs" "Ecclesiastes" "Jonah" "Daniel" "Matthew" "Mark" "Luke" "John" "Acts"
       "Romans" "1 Corinthians" "Hebrews" "James" "Revelation")
# `bible` prints a whole book for "Book1:1-N:M"; ask for up to chapter 200 and let it clip.
: > "$tmp/kjv_raw.txt"
for b in "${books[@]}"; do
  bible -l100000 "${b// /}1:1-200:200" >> "$tmp/kjv_raw.txt" 2>/dev/null || true
done

zcat /usr/share/dictd/devil.dict.dz > "$tmp/devil.dict"
cp /usr/share/dictd/devil.index "$tmp/devil.index"

python3 - "$tmp" "$out" "${books[@]}" <<'PY'
import re, sys
tmp, out, books = sys.argv[1], sys.argv[2], sys.argv[3:]

# ---- KJV: "Book N" heading, then "  V text" verse lines. One document per chapter: the heading,
# a blank line, then one verse per line with its number stripped.
chapters, cur = [], None
head = re.compile(r'^(%s) (\d+)$' % '|'.join(re.escape(b) for b in books))
for line in open(f'{tmp}/kjv_raw.txt', encoding='ascii'):
    line = line.rstrip()
    m = head.match(line)
    if m:
        cur = [line, '']
        chapters.append(cur)
        continue
    v = re.match(r'^\s+\d+ (.*)$', line)
    if v:
        cur.append(v.group(1).strip())
    elif line.strip():
        cur[-1] += ' ' + line.strip()  # a wrapped verse (not expected with -l100000)
seen = set()
for c in chapters:
    seen.add(head.match(c[0]).group(1))
missing = [b for b in books if b not in seen]
if missing:
    sys.exit(f'make_bundled_corpus: bible printed nothing for {missing}')
with open(f'{out}/kjv_bible.txt', 'w', encoding='ascii') as f:
    f.write('\n\n\n'.join('\n'.join(c) + '\n' for c in chapters))

# ---- Devil's Dictionary: the dictd index gives each entry's offset and length (base64 numbers).
# One document per distinct entry; the preface (inside the 00databaseinfo entry) is one more.
B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
def b64(s):
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n
data = open(f'{tmp}/devil.dict', 'rb').read()
entries, preface = {}, None
for line in open(f'{tmp}/devil.index', encoding='utf-8'):
    word, off, ln = line.rstrip('\n').split('\t')
    off, ln = b64(off), b64(ln)
    text = data[off:off + ln].decode('ascii')
    if word == '00databaseinfo':
        i = text.index('PREFACE')
        preface = text[i:]
    elif not word.startswith('00database'):
        entries[off] = text
def clean(t):
    t = re.sub(r'_([^_]+)_', r'\1', t)             # _italics_ markup (may span a line break)
    lines = [l.rstrip() for l in t.split('\n')]
    t = '\n'.join(lines).strip('\n')
    t = re.sub(r'\n{3,}', '\n\n', t)               # keep the entry one document
    return t + '\n'
docs = [clean(preface)] + [clean(entries[o]) for o in sorted(entries)]
with open(f'{out}/devils_dictionary.txt', 'w', encoding='ascii') as f:
    f.write('\n\n\n'.join(docs))
print(f'kjv_bible.txt: {len(chapters)} chapters; devils_dictionary.txt: {len(docs)} documents')
PY
wc -c "$out"/*.txt
sha256sum "$out"/*.txt
