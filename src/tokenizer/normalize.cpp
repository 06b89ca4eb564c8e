// NFC normalization (UAX #15): decompose, reorder by combining class, recompose primary composites.
#include "tokenizer/normalize.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tokenizer/pretokenize.h"

namespace dmat::tok {

namespace {

struct UnicodeRange {
  uint32_t lo, hi, cls;
};
struct Decomposition {
  uint32_t cp, off, len;
};
struct Composition {
  uint32_t a, b, c;
};
#include "tokenizer/unicode_nfc.inc"

constexpr uint32_t kByteMarker = 0x110000;  // kByteMarker + b: an invalid byte b, kept as is
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

uint32_t ccc(uint32_t cp) {
  if (cp < 0x300 || cp >= kByteMarker) return 0;
  const auto* end = kCombiningClass + std::size(kCombiningClass);
  const auto* r = std::upper_bound(kCombiningClass, end, cp, [](uint32_t v, const UnicodeRange& x) { return v < x.lo; });
  if (r == kCombiningClass) return 0;
  --r;
  return cp <= r->hi ? r->cls : 0;
}

void decompose(uint32_t cp, std::vector<uint32_t>& out) {
  if (cp >= kSBase && cp < kSBase + kSCount) {
    const uint32_t s = cp - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount) out.push_back(kTBase + s % kTCount);
    return;
  }
  const auto* end = kDecompositions + std::size(kDecompositions);
  const auto* d = std::lower_bound(kDecompositions, end, cp, [](const Decomposition& x, uint32_t v) { return x.cp < v; });
  if (d != end && d->cp == cp) out.insert(out.end(), kDecompositionPool + d->off, kDecompositionPool + d->off + d->len);
  else out.push_back(cp);
}

// The primary composite of (a, b), or 0.
uint32_t compose(uint32_t a, uint32_t b) {
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto* end = kCompositions + std::size(kCompositions);
  const auto* c = std::lower_bound(kCompositions, end, std::pair<uint32_t, uint32_t>{a, b},
                                   [](const Composition& x, const std::pair<uint32_t, uint32_t>& v) {
                                     return x.a != v.first ? x.a < v.first : x.b < v.second;
                                   });
  return (c != end && c->a == a && c->b == b) ? c->c : 0;
}

void append_utf8(uint32_t cp, std::string& out) {
  if (cp >= kByteMarker) out.push_back(char(cp - kByteMarker));
  else if (cp < 0x80) out.push_back(char(cp));
  else if (cp < 0x800) out += {char(0xC0 | (cp >> 6)), char(0x80 | (cp & 0x3F))};
  else if (cp < 0x10000) out += {char(0xE0 | (cp >> 12)), char(0x80 | ((cp >> 6) & 0x3F)), char(0x80 | (cp & 0x3F))};
  else
    out += {char(0xF0 | (cp >> 18)), char(0x80 | ((cp >> 12) & 0x3F)), char(0x80 | ((cp >> 6) & 0x3F)),
            char(0x80 | (cp & 0x3F))};
}

// NFC of a span that starts with at most one ASCII character followed by non-ASCII bytes.
void nfc_span(std::string_view s, std::string& out) {
  thread_local std::vector<uint32_t> d, r;
  d.clear();
  r.clear();
  for (size_t i = 0; i < s.size();) {
    const Utf8Char c = decode_utf8(reinterpret_cast<const unsigned char*>(s.data()) + i, s.size() - i);
    decompose(c.cp == 0xFFFFFFFFu ? kByteMarker + static_cast<unsigned char>(s[i]) : c.cp, d);
    i += c.len;
  }
  // Canonical ordering: a stable sort by combining class within each run of non-starters.
  for (size_t i = 1; i < d.size(); ++i) {
    const uint32_t c = ccc(d[i]);
    if (c == 0) continue;
    size_t j = i;
    while (j > 0 && ccc(d[j - 1]) > c) {
      std::swap(d[j - 1], d[j]);
      --j;
    }
  }
  // Canonical composition.
  size_t starter = 0;
  uint32_t last_class = 0;
  for (size_t i = 0; i < d.size(); ++i) {
    const uint32_t ch = d[i], cls = ccc(ch);
    if (i > 0 && !r.empty()) {
      const uint32_t comp = ccc(r[starter]) == 0 ? compose(r[starter], ch) : 0;
      if (comp && (last_class < cls || last_class == 0)) {
        r[starter] = comp;
        continue;
      }
    }
    if (cls == 0) starter = r.size();
    last_class = (i == 0 && cls != 0) ? 256 : cls;
    r.push_back(ch);
  }
  for (uint32_t cp : r) append_utf8(cp, out);
}

}  // namespace

void nfc(std::string_view in, std::string& out) {
  out.clear();
  out.reserve(in.size());
  size_t i = 0;
  while (i < in.size()) {
    size_t j = i;
    while (j < in.size() && static_cast<unsigned char>(in[j]) < 0x80) ++j;
    if (j == in.size()) {
      out.append(in.substr(i));
      break;
    }
    // in[j] starts a non-ASCII run; the ASCII character before it may be its starter.
    const size_t start = j > i ? j - 1 : j;
    out.append(in.substr(i, start - i));
    size_t k = j;
    while (k < in.size() && static_cast<unsigned char>(in[k]) >= 0x80) ++k;
    nfc_span(in.substr(start, k - start), out);
    i = k;
  }
}

}  // namespace dmat::tok
