// Hand-written matchers for the GPT-2 and LLaMA-3 pre-tokenization regexes (see pretokenize.h).
#include "tokenizer/pretokenize.h"

#include <algorithm>
#include <array>

namespace dmat::tok {

namespace {

struct UnicodeRange {
  uint32_t lo, hi, cls;
};
#include "tokenizer/unicode_tables.inc"

constexpr uint32_t kInvalid = 0xFFFFFFFFu;

constexpr std::array<CharClass, 128> make_ascii_table() {
  std::array<CharClass, 128> t{};
  for (int c = 0; c < 128; ++c) {
    CharClass k = CharClass::kOther;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) k = CharClass::kLetter;
    else if (c >= '0' && c <= '9') k = CharClass::kNumber;
    else if ((c >= 0x09 && c <= 0x0D) || c == ' ') k = CharClass::kSpace;
    t[size_t(c)] = k;
  }
  return t;
}
constexpr std::array<CharClass, 128> kAscii = make_ascii_table();

bool is_white_space(uint32_t cp) {  // Unicode White_Space, code points >= 0x80
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
         cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// The character at byte offset i of s (i < s.size()).
inline Utf8Char at(std::string_view s, size_t i) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data()) + i;
  if (*p < 0x80) return {*p, 1, kAscii[*p]};
  return decode_utf8(p, s.size() - i);
}

inline bool is_crlf(uint32_t cp) { return cp == '\r' || cp == '\n'; }

// End of the run of characters of class cls starting at i (at most max_chars of them).
inline size_t run_end(std::string_view s, size_t i, CharClass cls, size_t max_chars = SIZE_MAX) {
  size_t n = 0;
  while (i < s.size() && n < max_chars) {
    const Utf8Char c = at(s, i);
    if (c.cls != cls) break;
    i += c.len;
    ++n;
  }
  return i;
}

// \s+(?!\S) then \s+, for a whitespace run starting at i: the whole run when it reaches the end of
// the text or is a single character; otherwise all of it but its last character (which then leads
// the next piece).
inline size_t space_run(std::string_view s, size_t i) {
  size_t j = i, last = i, count = 0;
  while (j < s.size()) {
    const Utf8Char c = at(s, j);
    if (c.cls != CharClass::kSpace) break;
    last = j;
    j += c.len;
    ++count;
  }
  if (j == s.size() || count == 1) return j;
  return last;
}

inline uint32_t ascii_lower(uint32_t cp) { return (cp >= 'A' && cp <= 'Z') ? cp + 32 : cp; }

// 's 't 're 've 'm 'll 'd at i (s[i] == '\''); returns the end or 0. Case-insensitive for LLaMA-3,
// where (?i) also lets 's' match U+017F (long s), as Unicode simple case folding does.
size_t contraction(std::string_view s, size_t i, bool icase) {
  if (i + 1 >= s.size()) return 0;
  const Utf8Char c1 = at(s, i + 1);
  uint32_t a = c1.cp;
  if (icase) a = a == 0x17F ? 's' : ascii_lower(a);
  if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 1 + c1.len;
  if (i + 2 >= s.size() || !(a == 'r' || a == 'v' || a == 'l')) return 0;
  uint32_t b = static_cast<unsigned char>(s[i + 2]);
  if (icase) b = ascii_lower(b);
  if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
  return 0;
}

size_t match_gpt2(std::string_view s, size_t i) {
  const Utf8Char c = at(s, i);
  if (c.cp == '\'') {
    if (size_t e = contraction(s, i, false)) return e;
  }
  if (c.cp == ' ' && i + 1 < s.size()) {  // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
    const Utf8Char d = at(s, i + 1);
    if (d.cls != CharClass::kSpace) return run_end(s, i + 1, d.cls);
  }
  if (c.cls != CharClass::kSpace) return run_end(s, i, c.cls);
  return space_run(s, i);
}

size_t match_llama3(std::string_view s, size_t i, int digit_run) {
  const Utf8Char c = at(s, i);
  if (c.cp == '\'') {
    if (size_t e = contraction(s, i, true)) return e;
  }
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (c.cls == CharClass::kLetter) return run_end(s, i, CharClass::kLetter);
  const bool may_lead = c.cls != CharClass::kNumber && !is_crlf(c.cp);
  if (may_lead && i + c.len < s.size() && at(s, i + c.len).cls == CharClass::kLetter)
    return run_end(s, i + c.len, CharClass::kLetter);
  // \p{N}{1,k}
  if (c.cls == CharClass::kNumber) return run_end(s, i, CharClass::kNumber, size_t(digit_run));
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  size_t o = SIZE_MAX;
  if (c.cls == CharClass::kOther) o = i;
  else if (c.cp == ' ' && i + 1 < s.size() && at(s, i + 1).cls == CharClass::kOther) o = i + 1;
  if (o != SIZE_MAX) {
    size_t e = run_end(s, o, CharClass::kOther);
    while (e < s.size() && is_crlf(static_cast<unsigned char>(s[e]))) ++e;
    return e;
  }
  // \s*[\r\n]+ : up to and including the last CR/LF of the whitespace run
  size_t j = i, after_crlf = 0;
  while (j < s.size()) {
    const Utf8Char d = at(s, j);
    if (d.cls != CharClass::kSpace) break;
    j += d.len;
    if (is_crlf(d.cp)) after_crlf = j;
  }
  if (after_crlf) return after_crlf;
  return space_run(s, i);
}

}  // namespace

const char* unicode_version() { return kUnicodeVersion; }

CharClass char_class(uint32_t cp) {
  if (cp < 0x80) return kAscii[cp];
  if (cp == kInvalid) return CharClass::kOther;
  if (is_white_space(cp)) return CharClass::kSpace;
  const auto* end = kUnicodeRanges + std::size(kUnicodeRanges);
  const auto* r = std::upper_bound(kUnicodeRanges, end, cp, [](uint32_t v, const UnicodeRange& x) { return v < x.lo; });
  if (r == kUnicodeRanges) return CharClass::kOther;
  --r;
  return cp <= r->hi ? CharClass(r->cls) : CharClass::kOther;
}

Utf8Char decode_utf8(const unsigned char* p, size_t n) {
  const unsigned b0 = p[0];
  if (b0 < 0x80) return {b0, 1, kAscii[b0]};
  auto bad = Utf8Char{kInvalid, 1, CharClass::kOther};
  auto cont = [&](size_t k) { return k < n && (p[k] & 0xC0) == 0x80; };
  uint32_t cp;
  uint32_t len;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (!cont(1)) return bad;
    cp = ((b0 & 0x1F) << 6) | (p[1] & 0x3F);
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (!cont(1) || !cont(2)) return bad;
    cp = ((b0 & 0x0F) << 12) | ((p[1] & 0x3F) << 6) | (p[2] & 0x3F);
    if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF)) return bad;
    len = 3;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return bad;
    cp = ((b0 & 0x07) << 18) | ((p[1] & 0x3F) << 12) | ((p[2] & 0x3F) << 6) | (p[3] & 0x3F);
    if (cp < 0x10000 || cp > 0x10FFFF) return bad;
    len = 4;
  } else {
    return bad;
  }
  return {cp, len, char_class(cp)};
}

void split_regex(SplitPattern pattern, std::string_view text, std::vector<std::string_view>& out, int digit_run) {
  size_t i = 0;
  while (i < text.size()) {
    const size_t e = pattern == SplitPattern::kGpt2 ? match_gpt2(text, i) : match_llama3(text, i, digit_run);
    out.push_back(text.substr(i, e - i));
    i = e;
  }
}

void split_digits(std::string_view text, bool individual, std::vector<std::string_view>& out) {
  size_t start = 0, i = 0;
  auto digit = [&](size_t k) { return text[k] >= '0' && text[k] <= '9'; };
  while (i < text.size()) {
    if (!digit(i)) {
      ++i;
      continue;
    }
    if (i > start) out.push_back(text.substr(start, i - start));
    size_t e = i + 1;
    if (!individual)
      while (e < text.size() && digit(e)) ++e;
    out.push_back(text.substr(i, e - i));
    start = i = e;
  }
  if (start < text.size()) out.push_back(text.substr(start));
}

}  // namespace dmat::tok
