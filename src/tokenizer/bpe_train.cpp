// BPE training: piece counting (parallel) and the merge loop (pair counts, occurrence lists, lazy heap).
#include "tokenizer/bpe_train.h"

#include <algorithm>
#include <chrono>
#include <queue>

#include <omp.h>
#include <spdlog/spdlog.h>

#include "core/error.h"

namespace dmat {

namespace {

BpeDefinition bytes_only(const std::string& pretokenizer) {
  BpeDefinition d;
  for (int b = 0; b < 256; ++b) d.tokens.emplace_back(1, char(b));
  d.tokens.emplace_back("<|endoftext|>");
  d.added.emplace_back(256, "<|endoftext|>");
  d.eot = "<|endoftext|>";
  d.pretok = pretokenizer_preset(pretokenizer);
  return d;
}

inline uint64_t pair_key(uint32_t a, uint32_t b) { return (uint64_t(a) << 32) | b; }

struct PairInfo {
  int64_t count = 0;
  std::vector<uint32_t> where;  // words that held the pair at some point (may repeat, may be stale)
};

struct HeapEntry {
  int64_t count;
  uint64_t key;
  // priority_queue puts the largest first: larger count, then the smaller pair key.
  bool operator<(const HeapEntry& o) const { return count != o.count ? count < o.count : key > o.key; }
};

}  // namespace

PieceCounter::PieceCounter(const std::string& pretokenizer, int threads)
    : splitter_(bytes_only(pretokenizer), "(pre-tokenizer " + pretokenizer + ")"),
      threads_(std::max(1, threads)),
      maps_(size_t(threads_)) {}

void PieceCounter::add(const std::vector<std::string>& docs) {
  const int64_t n = int64_t(docs.size());
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads_)
  for (int64_t i = 0; i < n; ++i) {
    auto& m = maps_[size_t(omp_get_thread_num())];
    splitter_.each_piece(docs[size_t(i)], [&](std::string_view p) {
      auto it = m.find(std::string(p));
      if (it != m.end()) ++it->second;
      else m.emplace(std::string(p), 1);
    });
  }
  documents_ += docs.size();
  for (const auto& d : docs) bytes_ += d.size();
}

const std::unordered_map<std::string, int64_t>& PieceCounter::finish() {
  for (size_t t = 1; t < maps_.size(); ++t) {
    for (auto& [k, v] : maps_[t]) maps_[0][k] += v;
    maps_[t] = {};
  }
  return maps_[0];
}

BpeTokenizer train_bpe(const std::unordered_map<std::string, int64_t>& counts, const BpeTrainOptions& opt,
                       const std::string& origin) {
  if (opt.special.empty()) fail("tokenizer train: at least one special token (the end-of-document token) is needed");
  for (size_t i = 0; i < opt.special.size(); ++i) {
    if (opt.special[i].empty()) fail("tokenizer train: special token {} is empty", i);
    for (size_t k = 0; k < i; ++k)
      if (opt.special[k] == opt.special[i]) fail("tokenizer train: special token \"{}\" given twice", opt.special[i]);
  }
  const uint64_t floor = 256 + opt.special.size();
  if (opt.vocab_size < floor)
    fail("tokenizer train: --vocab {} is too small: 256 byte tokens + {} special tokens need at least {}",
         opt.vocab_size, opt.special.size(), floor);
  const size_t target_merges = opt.vocab_size - floor;

  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, char(b));
  std::vector<std::pair<uint32_t, uint32_t>> merges;

  // Words: each distinct piece as a symbol sequence with its count (sorted for a fixed layout).
  std::vector<const std::pair<const std::string, int64_t>*> sorted;
  sorted.reserve(counts.size());
  for (const auto& kv : counts) sorted.push_back(&kv);
  std::sort(sorted.begin(), sorted.end(), [](auto* x, auto* y) { return x->first < y->first; });
  std::vector<std::vector<uint32_t>> words(sorted.size());
  std::vector<int64_t> wcount(sorted.size());
  std::unordered_map<uint64_t, PairInfo> pairs;
  for (size_t w = 0; w < sorted.size(); ++w) {
    const std::string& s = sorted[w]->first;
    wcount[w] = sorted[w]->second;
    words[w].assign(s.begin(), s.end());
    for (auto& x : words[w]) x &= 0xFF;
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      PairInfo& p = pairs[pair_key(words[w][i], words[w][i + 1])];
      p.count += wcount[w];
      if (p.where.empty() || p.where.back() != w) p.where.push_back(uint32_t(w));
    }
  }
  std::priority_queue<HeapEntry> heap;
  for (const auto& [k, p] : pairs) heap.push(HeapEntry{p.count, k});

  const auto t0 = std::chrono::steady_clock::now();
  auto last_log = t0;
  std::unordered_map<uint64_t, int64_t> delta;
  while (merges.size() < target_merges && !heap.empty()) {
    const HeapEntry top = heap.top();
    heap.pop();
    auto it = pairs.find(top.key);
    const int64_t cur = it == pairs.end() ? 0 : it->second.count;
    if (cur != top.count) {  // stale entry: counts only ever fall for existing pairs
      if (cur > 0) heap.push(HeapEntry{cur, top.key});
      continue;
    }
    if (cur < opt.min_frequency) break;
    const uint32_t a = uint32_t(top.key >> 32), b = uint32_t(top.key & 0xFFFFFFFFu);
    const uint32_t nid = uint32_t(tokens.size());
    tokens.push_back(tokens[a] + tokens[b]);
    merges.emplace_back(a, b);
    std::vector<uint32_t> where = std::move(it->second.where);
    pairs.erase(it);
    std::sort(where.begin(), where.end());
    where.erase(std::unique(where.begin(), where.end()), where.end());
    delta.clear();
    for (uint32_t w : where) {
      auto& s = words[w];
      const int64_t c = wcount[w];
      bool changed = false;
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        if (s[i] != a || s[i + 1] != b) continue;
        changed = true;
        if (i > 0) {
          delta[pair_key(s[i - 1], a)] -= c;
          delta[pair_key(s[i - 1], nid)] += c;
        }
        if (i + 2 < s.size()) {
          delta[pair_key(b, s[i + 2])] -= c;
          delta[pair_key(nid, s[i + 2])] += c;
        }
        s[i] = nid;
        s.erase(s.begin() + int64_t(i) + 1);
      }
      if (!changed) continue;
      for (size_t i = 0; i + 1 < s.size(); ++i)
        if (s[i] == nid || s[i + 1] == nid) {
          auto& wl = pairs[pair_key(s[i], s[i + 1])].where;
          if (wl.empty() || wl.back() != w) wl.push_back(w);
        }
    }
    for (const auto& [k, d] : delta) {
      if (d == 0 || k == top.key) continue;
      auto& p = pairs[k];
      p.count += d;
      const bool has_new = uint32_t(k >> 32) == nid || uint32_t(k & 0xFFFFFFFFu) == nid;
      if (has_new && p.count > 0) heap.push(HeapEntry{p.count, k});
      if (p.count <= 0 && p.where.empty()) pairs.erase(k);
    }
    const auto now = std::chrono::steady_clock::now();
    if (now - last_log > std::chrono::seconds(10)) {
      last_log = now;
      spdlog::info("tokenizer train: {} of {} merges ({:.0f} s)", merges.size(), target_merges,
                   std::chrono::duration<double>(now - t0).count());
    }
  }
  if (merges.size() < target_merges)
    spdlog::warn("tokenizer train: only {} merges found (no pair left with >= {} occurrences); the vocabulary has {} "
                 "tokens instead of {}", merges.size(), opt.min_frequency, 256 + merges.size() + opt.special.size(),
                 opt.vocab_size);

  BpeDefinition d;
  d.tokens = std::move(tokens);
  d.merges = std::move(merges);
  for (const auto& sp : opt.special) {
    d.added.emplace_back(uint32_t(d.tokens.size()), sp);
    d.tokens.push_back(sp);
  }
  d.eot = opt.special[0];
  d.pretok = pretokenizer_preset(opt.pretokenizer);
  return BpeTokenizer(std::move(d), origin);
}

}  // namespace dmat
