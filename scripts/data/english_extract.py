#!/usr/bin/env python3
"""Extracts English prose from installed Debian packages into plain-text files for dmatrain.

Usage: english_extract.py OUT_DIR SOURCE...   (scripts/data/english.sh runs it; python3 stdlib only)
Each SOURCE writes OUT_DIR/<source>.txt: UTF-8 text, one document per dictionary entry / man page /
chapter / file, documents separated by two blank lines (the rule `dmatrain data prepare` splits on),
runs of blank lines inside a document collapsed to one, trailing spaces removed. Output order is
sorted and fixed, so the same packages give the same bytes.
"""
import concurrent.futures
import glob
import gzip
import html.parser
import os
import re
import subprocess
import sys

B64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'


def b64(s):
    n = 0
    for ch in s:
        n = n * 64 + B64.index(ch)
    return n


def clean(doc):
    lines = [l.rstrip() for l in doc.replace('\r\n', '\n').replace('\r', '\n').split('\n')]
    doc = '\n'.join(lines).strip('\n')
    doc = re.sub(r'\n{3,}', '\n\n', doc)
    return doc + '\n' if doc.strip() else ''


def write_docs(out, name, docs):
    docs = [d for d in (clean(x) for x in docs) if d]
    with open(os.path.join(out, name + '.txt'), 'w', encoding='utf-8') as f:
        f.write('\n\n'.join(docs))
    print(f'{name}: {len(docs)} documents', flush=True)


def read_text(path):
    data = gzip.open(path).read() if path.endswith('.gz') else open(path, 'rb').read()
    return data.decode('utf-8', errors='replace')


def dictd(name):
    """dictd database: one document per entry, in file order (00database* entries dropped)."""
    index = f'/usr/share/dictd/{name}.index'
    data = gzip.open(f'/usr/share/dictd/{name}.dict.dz').read()
    seen, docs = set(), []
    for line in open(index, encoding='utf-8', errors='replace'):
        parts = line.rstrip('\n').split('\t')
        if len(parts) < 3 or parts[0].startswith('00database') or parts[0].startswith('00-database'):
            continue
        off, ln = b64(parts[1]), b64(parts[2])
        if off in seen:
            continue
        seen.add(off)
        docs.append((off, data[off:off + ln].decode('utf-8', errors='replace')))
    return [d for _, d in sorted(docs)]


def src_gcide(out):
    # GCIDE's dictd text marks cross references {like this} and pronunciations \like this\.
    docs = [re.sub(r'[{}]', '', d) for d in dictd('gcide')]
    write_docs(out, 'gcide', docs)


def src_foldoc(out):
    write_docs(out, 'foldoc', [re.sub(r'[{}]', '', d) for d in dictd('foldoc')])


def src_devil(out):
    write_docs(out, 'devil', [re.sub(r'_([^_]+)_', r'\1', d) for d in dictd('devil')])


def src_wordnet(out):
    # data.<pos> lines: "offset lex_filenum ss_type w_cnt word lex_id ... | gloss". One document per
    # 200 synsets: "word, word: gloss" lines.
    docs = []
    for pos in ('noun', 'verb', 'adj', 'adv'):
        lines = []
        for line in open(f'/usr/share/wordnet/data.{pos}', encoding='utf-8', errors='replace'):
            if line.startswith('  ') or '|' not in line:
                continue
            head, gloss = line.split('|', 1)
            f = head.split()
            n = int(f[3], 16)
            words = [f[4 + 2 * i].replace('_', ' ') for i in range(n)]
            words = [re.sub(r'\([a-z]+\)$', '', w) for w in words]
            lines.append(f'{", ".join(words)}: {gloss.strip()}')
        for i in range(0, len(lines), 200):
            docs.append('\n'.join(lines[i:i + 200]))
    write_docs(out, 'wordnet', docs)


BOOKS = ("Genesis Exodus Leviticus Numbers Deuteronomy Joshua Judges Ruth 1Samuel 2Samuel 1Kings 2Kings "
         "1Chronicles 2Chronicles Ezra Nehemiah Esther Job Psalms Proverbs Ecclesiastes Song Isaiah Jeremiah "
         "Lamentations Ezekiel Daniel Hosea Joel Amos Obadiah Jonah Micah Nahum Habakkuk Zephaniah Haggai "
         "Zechariah Malachi Matthew Mark Luke John Acts Romans 1Corinthians 2Corinthians Galatians Ephesians "
         "Philippians Colossians 1Thessalonians 2Thessalonians 1Timothy 2Timothy Titus Philemon Hebrews James "
         "1Peter 2Peter 1John 2John 3John Jude Revelation").split()


def src_kjv(out):
    # The whole King James Version through the `bible` program; one document per chapter.
    docs = []
    for b in BOOKS:
        txt = subprocess.run(['bible', '-l100000', f'{b}1:1-200:200'], capture_output=True, text=True).stdout
        cur = None
        for line in txt.split('\n'):
            m = re.match(r'^(\S.*) (\d+)$', line.rstrip())
            if m and not line.startswith(' '):
                cur = [line.rstrip(), '']
                docs.append(cur)
                continue
            v = re.match(r'^\s+\d+ (.*)$', line)
            if v and cur is not None:
                cur.append(v.group(1).strip())
    write_docs(out, 'kjv', ['\n'.join(c) for c in docs])


def src_perldoc(out):
    pods = sorted({os.path.realpath(p) for p in glob.glob('/usr/share/perl/*/pod/*.pod')})
    def one(p):
        return subprocess.run(['pod2text', '-w', '100', p], capture_output=True, text=True, errors='replace').stdout
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as ex:
        write_docs(out, 'perldoc', list(ex.map(one, pods)))


def src_pythondoc(out):
    files = sorted({os.path.realpath(f) for f in
                    glob.glob('/usr/share/doc/python3*/html/_sources/**/*.rst.txt', recursive=True)})
    write_docs(out, 'pythondoc', [read_text(f) for f in files])


def src_linuxdoc(out):
    files = sorted(glob.glob('/usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz', recursive=True))
    write_docs(out, 'linuxdoc', [read_text(f) for f in files])


def src_manpages(out):
    pkgs = ['manpages', 'manpages-dev', 'glibc-doc']
    files = []
    for p in pkgs:
        listing = subprocess.run(['dpkg', '-L', p], capture_output=True, text=True).stdout.split('\n')
        files += [f for f in listing if re.match(r'^/usr/share/man/man\d/.*\.gz$', f) and os.path.isfile(f)
                  and not os.path.islink(f)]
    files = sorted(set(files))
    env = dict(os.environ, MANWIDTH='80', LC_ALL='C.UTF-8', MAN_KEEP_FORMATTING='0')
    def one(f):
        # Pages that are only ".so other_page" render as that page: skip them (duplicates).
        if re.match(r'^\.so ', read_text(f)):
            return ''
        r = subprocess.run(['man', '--no-hyphenation', '--no-justification', '-l', f], capture_output=True,
                           env=env)
        txt = subprocess.run(['col', '-bx'], input=r.stdout, capture_output=True).stdout
        return txt.decode('utf-8', errors='replace')
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as ex:
        write_docs(out, 'manpages', list(ex.map(one, files)))


def src_info(out):
    # Texinfo manuals shipped as info files (GNU coding standards, bash reference): one document per node.
    files = ['/usr/share/info/standards.info.gz', '/usr/share/info/maintain.info.gz']
    files += sorted(glob.glob('/usr/share/info/bashref.info*.gz')) or sorted(glob.glob('/usr/share/info/bash.info*.gz'))
    docs = []
    for f in files:
        if not os.path.exists(f):
            continue
        for node in read_text(f).split('\x1f'):
            node = re.sub(r'^\s*File: [^\n]*\n', '', node)
            if node.strip().startswith('Tag Table:') or node.strip().startswith('Indirect:'):
                continue
            docs.append(node)
    write_docs(out, 'info', docs)


def chunks(txt, paragraphs=40):
    """A long book without a reliable section marker: documents of `paragraphs` paragraphs each."""
    paras = re.split(r'\n\s*\n', txt)
    return ['\n\n'.join(paras[i:i + paragraphs]) for i in range(0, len(paras), paragraphs)]


def src_debref(out):
    write_docs(out, 'debref', chunks(read_text('/usr/share/debian-reference/debian-reference.en.txt.gz')))


def src_jargon(out):
    write_docs(out, 'jargon', chunks(read_text('/usr/share/doc/jargon-text/jargon.txt.gz')))


def src_fortunes(out):
    docs = []
    for f in sorted(glob.glob('/usr/share/games/fortunes/*')):
        if os.path.isdir(f) or os.path.islink(f) or f.endswith(('.dat', '.u8')):
            continue
        docs += read_text(f).split('\n%\n')
    write_docs(out, 'fortunes', docs)


SOURCES = {n[4:]: fn for n, fn in globals().items() if n.startswith('src_')}

if __name__ == '__main__':
    if len(sys.argv) < 3:
        sys.exit(f'usage: {sys.argv[0]} OUT_DIR SOURCE... (sources: {" ".join(SOURCES)})')
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for s in sys.argv[2:]:
        if s not in SOURCES:
            sys.exit(f'english_extract: unknown source {s} (known: {" ".join(SOURCES)})')
        SOURCES[s](out)
