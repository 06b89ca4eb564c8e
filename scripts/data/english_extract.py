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


# ---------------------------------------------------------------------------------------------------
# english_more: further Debian documentation packages, unpacked (dpkg-deb -x) under ROOT/<package>/.
# One source per package; one document per file (info: per node). Code blocks are dropped where the
# markup marks them (<pre>, sphinx code directives and literal blocks, markdown fences, doctests), and a
# document is kept only if it is at least MIN_DOC bytes and mostly letters and spaces (no tables of
# numbers, no code dumps), see prose().

# package -> (format, globs relative to ROOT/<package>, regex of paths to leave out)
MORE = {
    'debian-handbook': ('html', ['usr/share/doc/debian-handbook/html/en-US/*.html'], None),
    'debian-policy': ('rst', ['usr/share/doc/debian-policy/policy.html/_sources/*.txt'], None),
    'developers-reference': ('rst', ['usr/share/developers-reference/_sources/*.txt'], None),
    'debian-faq': ('html', ['usr/share/doc/debian/FAQ/*.en.html'], None),
    'maint-guide': ('html', ['usr/share/doc/maint-guide/html/*.en.html'], None),
    'harden-doc': ('html', ['usr/share/doc/harden-doc/html/en-US/*.html'], None),
    'debian-history': ('html', ['usr/share/doc/debian-history/docs/*.en.html'], None),
    'postgresql-doc-15': ('html', ['usr/share/doc/postgresql-doc-15/html/*.html'], None),
    'sqlite3-doc': ('html', ['usr/share/doc/sqlite3/**/*.html'], None),
    'apache2-doc': ('html', ['usr/share/doc/apache2-doc/manual/en/**/*.html'], None),
    'git-doc': ('html', ['usr/share/doc/git-doc/**/*.html'], None),
    'gimp-help-en': ('html', ['usr/share/gimp/2.0/help/en/**/*.html'], None),
    'libreoffice-help-en-us': ('html', ['usr/share/libreoffice/help/en-US/**/*.html'], None),
    'gnome-user-docs': ('page', ['usr/share/help/C/**/*.page'], None),
    'python-django-doc': ('html', ['usr/share/doc/python-django-doc/html/**/*.html'],
                          r'/(genindex|py-modindex|search)\.html$'),
    'python-scipy-doc': ('html', ['usr/share/doc/python-scipy-doc/html/**/*.html'],
                         r'/(genindex|py-modindex|search)\.html$'),
    'python-pandas-doc': ('rst', ['usr/share/doc/python-pandas-doc/html/_sources/**/*.txt'], None),
    'python-statsmodels-doc': ('rst', ['usr/share/doc/python-statsmodels-doc/html/_sources/**/*.txt'], None),
    'sphinx-doc': ('rst', ['usr/share/doc/sphinx-doc/html/_sources/**/*.txt'], None),
    'cmake-doc': ('rst', ['usr/share/doc/cmake-data/html/_sources/**/*.txt'], None),
    'llvm-15-doc': ('rst', ['usr/share/doc/llvm-15-doc/html/_sources/**/*.txt'], None),
    'clang-15-doc': ('rst', ['usr/share/doc/clang-15/html/_sources/**/*.txt'], None),
    'ghc-doc': ('rst', ['usr/share/doc/ghc-doc/html/users_guide/_sources/**/*.txt'], None),
    'nodejs-doc': ('md', ['usr/share/doc/nodejs/api/*.md.gz'], r'/(all|index)\.md'),
    'vim-runtime': ('txt', ['usr/share/vim/vim90/doc/*.txt'], None),
    'rust-doc': ('html', ['usr/share/doc/rust-doc/html/**/*.html'],
                 r'/src/|/implementors/|/all\.html$|/(settings|help|search-index|print)\.html$|/sidebar-items'),
    'openjdk-17-doc': ('html', ['usr/share/doc/openjdk-17-doc/api/**/*.html'],
                       r'/class-use/|/index-files/|-tree\.html$|/(allclasses|allpackages|constant-values|'
                       r'serialized-form|overview-tree|index-all|deprecated-list|search|help-doc)[^/]*\.html$'),
    'qtbase5-doc-html': ('html', ['usr/share/qt5/doc/**/*.html'], r'-members\.html$|-obsolete\.html$'),
    'cppreference-doc-en-html': ('html', ['usr/share/cppreference/doc/html/en/**/*.html'], None),
    'erlang-doc': ('html', ['usr/share/doc/erlang-doc/**/*.html'], r'/java/|/(index|users_guide|release_notes)\.html$'),
    'racket-doc': ('html', ['usr/share/doc/racket/**/*.html'], None),
    'lilypond-doc': ('info', ['usr/share/info/*.info*'], None),
    'octave-doc': ('info', ['usr/share/info/*.info*'], None),
    'maxima-doc': ('info', ['usr/share/info/*.info*'], r'maxima-index'),
    'gnuplot-doc': ('info', ['usr/share/info/*.info*'], None),
    'r-doc-info': ('info', ['usr/share/info/*.info*'], None),
    'binutils-doc': ('info', ['usr/share/info/*.info*'], None),
    'autoconf-doc': ('info', ['usr/share/info/*.info*'], None),
    'automake': ('info', ['usr/share/info/*.info*'], None),
    'coreutils': ('info', ['usr/share/info/*.info*'], None),
    'findutils': ('info', ['usr/share/info/*.info*'], None),
    'diffutils': ('info', ['usr/share/info/*.info*'], None),
    'grep': ('info', ['usr/share/info/*.info*'], None),
    'sed': ('info', ['usr/share/info/*.info*'], None),
    'gzip': ('info', ['usr/share/info/*.info*'], None),
    'm4': ('info', ['usr/share/info/*.info*'], None),
    'wget': ('info', ['usr/share/info/*.info*'], None),
    'bc': ('info', ['usr/share/info/*.info*'], None),
    'ed': ('info', ['usr/share/info/*.info*'], None),
    'time': ('info', ['usr/share/info/*.info*'], None),
    'tcl8.6-doc': ('man', ['usr/share/man/man*/*.gz'], None),
    'tk8.6-doc': ('man', ['usr/share/man/man*/*.gz'], None),
}
MIN_DOC = 200

BLOCK = {'p', 'div', 'br', 'li', 'ul', 'ol', 'dl', 'dt', 'dd', 'tr', 'table', 'blockquote', 'section',
         'article', 'main', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'title', 'hr', 'figure', 'caption',
         'item', 'note', 'steps', 'list', 'terms', 'tree', 'td', 'th'}
SKIP = {'script', 'style', 'pre', 'nav', 'header', 'footer', 'noscript', 'svg', 'math', 'head', 'button',
        'form', 'select', 'textarea', 'aside', 'screen', 'synopsis', 'info', 'code-block', 'listing', 'media',
        'comment'}
CLASS_SKIPPABLE = {'div', 'section', 'table', 'ul', 'ol', 'dl', 'details'}
SKIP_CLASS = re.compile(r'\b(sidebar|sphinxsidebar|related|nav|navbar|navigation|navheader|navfooter|breadcrumbs?|'
                        r'footer|navigationbar|toc|toctree-wrapper|highlight|sourceCode|programlisting|screen|example|'
                        r'rustdoc-toolbar|sub-nav|search|menu|copyright|t-navbar|t-dcl-begin|t-example|'
                        r'SRC|SOURCE|code-header|signature|member-signature|method-signature|type-signature|'
                        r'summary-table|member-summary|memberSummary|alignedsummary|propsummary|SCodeFlow|SVInsetFlow|RktBlk|doc-sidebar|tocset|versionmodified added|linenos)\b')


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip, self.depth = [], None, 0

    def handle_starttag(self, tag, attrs):
        if self.skip:
            if tag == self.skip:
                self.depth += 1
            return
        a = dict(attrs)
        if tag in SKIP or a.get('role') == 'navigation' or (
                tag in CLASS_SKIPPABLE and SKIP_CLASS.search(a.get('class') or '')):
            if tag not in ('br', 'hr', 'img', 'input', 'meta', 'link'):
                self.skip, self.depth = tag, 1
            return
        if tag in BLOCK:
            self.out.append('\n\n' if tag in ('p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'title', 'section') else '\n')

    def handle_endtag(self, tag):
        if self.skip:
            if tag == self.skip:
                self.depth -= 1
                if self.depth == 0:
                    self.skip = None
            return
        if tag in BLOCK:
            self.out.append('\n\n' if tag in ('p', 'h1', 'h2', 'h3', 'h4', 'h5', 'h6', 'title') else '\n')

    def handle_data(self, data):
        if not self.skip:
            self.out.append(re.sub(r'\s+', ' ', data))


def html_text(src):
    p = _Text()
    p.feed(src)
    p.close()
    lines = [l.strip() for l in ''.join(p.out).split('\n')]
    return '\n'.join(lines)


RST_DROP = re.compile(r'^(\s*)\.\. (code-block|code|sourcecode|literalinclude|doctest|testcode|testoutput|testsetup|'
                      r'ipython|plot|math|autosummary|toctree|image|figure|raw|csv-table|list-table|highlight|'
                      r'index|productionlist|graphviz|inheritance-diagram|automodule|autoclass|autofunction|'
                      r'include|only|tabularcolumns|jinja|program-output|command-output|prompt|ifconfig|'
                      r'currentmodule|module|contents|meta|table)::')


def rst_text(src):
    """reST source without code: literal blocks (after '::'), code/figure/table directives with their
    bodies, doctest sessions and comments dropped; other directives keep their body; roles unwrapped."""
    out, lines, i = [], src.split('\n'), 0
    def indent(l):
        return len(l) - len(l.lstrip())
    while i < len(lines):
        l = lines[i]
        s = l.strip()
        drop = RST_DROP.match(l) or re.match(r'^\s*\.\.(\s+[_|\[].*|\s*)$', l)
        if drop or (s.endswith('::') and not re.match(r'^\s*\.\. ', l)):
            # the indented body after this line goes (for a paragraph ending in '::', only the body)
            base = indent(l)
            if not drop:
                out.append(l[:len(l) - 2].rstrip() + (':' if not s.endswith(' ::') and s != '::' else ''))
            i += 1
            while i < len(lines) and (not lines[i].strip() or indent(lines[i]) > base):
                i += 1
            out.append('')
            continue
        if s.startswith('>>>'):
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        m = re.match(r'^(\s*)\.\. [\w:-]+::\s*(.*)$', l)
        if m:
            out.append(m.group(1) + m.group(2))
            i += 1
            while i < len(lines) and re.match(r'^\s+:[\w -]+:', lines[i]):
                i += 1
            continue
        if re.match(r'^\s*:[\w -]+:', l) and not out[-1:] == ['']:
            i += 1
            continue
        out.append(l)
        i += 1
    t = '\n'.join(out)
    t = re.sub(r':[\w:+.-]+:`~?([^`<]*?)\s*(<[^`>]*>)?`', r'\1', t)      # :role:`text <target>` -> text
    t = re.sub(r'`([^`<]+?)\s*<[^`>]+>`__?', r'\1', t)                  # `text <url>`_ -> text
    t = re.sub(r'``([^`]+)``', r'\1', t)
    t = re.sub(r'`([^`]+)`_{0,2}', r'\1', t)
    t = re.sub(r'^\s*([=\-~^"*+#\'`:.]){4,}\s*$', '', t, flags=re.M)     # section underlines
    t = re.sub(r'\|(\w[\w -]*)\|', r'\1', t)
    return t


def md_text(src):
    t = re.sub(r'^(```|~~~).*?^\1[^\n]*$', '', src, flags=re.M | re.S)   # fenced code
    t = re.sub(r'<!--.*?-->', '', t, flags=re.S)
    t = re.sub(r'^#+\s*', '', t, flags=re.M)
    t = re.sub(r'\[([^\]]*)\]\[[^\]]*\]|\[([^\]]*)\]\([^)]*\)', lambda m: m.group(1) or m.group(2) or '', t)
    t = re.sub(r'^\[[^\]]+\]:.*$', '', t, flags=re.M)
    return t.replace('`', '')


def info_docs(src):
    docs = []
    for node in src.split('\x1f'):
        node = re.sub(r'^\s*File: [^\n]*\n', '', node)
        if node.strip().startswith(('Tag Table:', 'Indirect:', 'Local Variables')) or '\x00\x08[index' in node:
            continue
        node = re.sub(r'^\* Menu:.*$|^\* [^\n]*::.*$', '', node, flags=re.M)   # menus
        docs.append(node)
    return docs


def prose(doc):
    """Mostly letters and spaces, at least MIN_DOC bytes: drops tables of numbers and code dumps."""
    doc = clean(doc)
    if len(doc) < MIN_DOC:
        return ''
    letters = sum(1 for c in doc if c.isalpha() or c == ' ')
    return doc if letters >= 0.80 * len(doc) else ''


MAN_ENV = dict(os.environ, MANWIDTH='80', LC_ALL='C.UTF-8', MAN_KEEP_FORMATTING='0')


def more_one(job):
    fmt, path = job
    if fmt == 'man':
        if re.match(r'^\.so ', read_text(path)):
            return []
        r = subprocess.run(['man', '--no-hyphenation', '--no-justification', '-l', path], capture_output=True,
                           env=MAN_ENV)
        docs = [subprocess.run(['col', '-bx'], input=r.stdout, capture_output=True).stdout.decode('utf-8', 'replace')]
    else:
        src = read_text(path)
        if fmt in ('html', 'page'):
            docs = [html_text(src)]
        elif fmt == 'rst':
            docs = [rst_text(src)]
        elif fmt == 'md':
            docs = [md_text(src)]
        elif fmt == 'info':
            docs = info_docs(src)
        else:
            docs = [src]
    kept = [d for d in (prose(x) for x in docs) if d]
    return kept, sum(len(clean(x)) for x in docs)


def extract_more(out, root, names, jobs):
    import multiprocessing
    with multiprocessing.Pool(jobs) as pool:
        for name in names:
            fmt, globs, excl = MORE[name]
            base = os.path.join(root, name)
            files = set()
            for g in globs:
                files.update(f for f in glob.glob(os.path.join(base, g), recursive=True)
                             if os.path.isfile(f) and not os.path.islink(f))
            files = sorted(f for f in files if not (excl and re.search(excl, f[len(base):])))
            if not files:
                sys.exit(f'english_extract: {name}: no files under {base} match {globs}')
            docs, raw = [], 0
            for kept, n in pool.imap(more_one, [(fmt, f) for f in files], chunksize=8):
                docs += kept
                raw += n
            write_docs(out, name, docs)
            kept = sum(len(d) for d in docs)
            print(f'{name}: {len(files)} files, {raw} bytes of text, {kept} kept ({kept / max(raw, 1):.0%})',
                  flush=True)


def split_docs(text):
    """Documents as `dmatrain data prepare` splits a text file: at runs of two or more blank lines."""
    docs = re.split(r'\n(?:[ \t]*\n){2,}', text.replace('\r\n', '\n').replace('\r', '\n'))
    return [d.strip('\n') + '\n' for d in docs if d.strip()]


def dedup_chunk(existing, indir, outdir, names, chunk_bytes):
    """Drops documents of indir/<name>.txt seen in existing/*.txt or earlier (in `names` order), writes the
    rest as outdir/<name>-NNN.txt files of at most chunk_bytes (split at document boundaries) and prints
    name, documents kept, duplicates dropped, bytes kept (tab-separated)."""
    import hashlib
    seen = set()
    for f in sorted(glob.glob(os.path.join(existing, '*.txt'))):
        for d in split_docs(open(f, encoding='utf-8').read()):
            seen.add(hashlib.sha256(d.encode()).digest())
    os.makedirs(outdir, exist_ok=True)
    for name in names:
        keep, dups = [], 0
        for d in split_docs(open(os.path.join(indir, name + '.txt'), encoding='utf-8').read()):
            h = hashlib.sha256(d.encode()).digest()
            if h in seen:
                dups += 1
                continue
            seen.add(h)
            keep.append(d)
        chunks, cur, size = [], [], 0
        for d in keep:
            n = len(d.encode()) + 2
            if cur and size + n > chunk_bytes:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(d)
            size += n
        if cur:
            chunks.append(cur)
        total = 0
        for k, c in enumerate(chunks):
            data = '\n\n'.join(c).encode()
            total += len(data)
            with open(os.path.join(outdir, f'{name}-{k:03d}.txt'), 'wb') as f:
                f.write(data)
        print(f'{name}\t{len(keep)}\t{dups}\t{total}', flush=True)

if __name__ == '__main__':
    if len(sys.argv) > 1 and sys.argv[1] == '--more':        # --more ROOT OUT_DIR JOBS PACKAGE...
        os.makedirs(sys.argv[3], exist_ok=True)
        bad = [n for n in sys.argv[5:] if n not in MORE]
        if bad:
            sys.exit(f'english_extract: unknown package {bad} (known: {" ".join(MORE)})')
        extract_more(sys.argv[3], sys.argv[2], sys.argv[5:], int(sys.argv[4]))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == '--dedup':       # --dedup EXISTING_DIR IN_DIR OUT_DIR CHUNK_BYTES NAME...
        dedup_chunk(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[6:], int(sys.argv[5]))
        sys.exit(0)
    if len(sys.argv) < 3:
        sys.exit(f'usage: {sys.argv[0]} OUT_DIR SOURCE... (sources: {" ".join(SOURCES)})')
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for s in sys.argv[2:]:
        if s not in SOURCES:
            sys.exit(f'english_extract: unknown source {s} (known: {" ".join(SOURCES)})')
        SOURCES[s](out)
