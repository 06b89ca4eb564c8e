// `dmatrain needle`: the trials, their scoring on the decoding caches, the grid and its rows (needle.h).
#include "train/needle.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "core/error.h"
#include "core/rng.h"
#include "data/shard.h"
#include "train/checkpoint.h"
#include "train/generate.h"
#include "train/trainer.h"

namespace dmat {
namespace {

// Positions are 32-bit in the kernels: the bound config.cpp puts on train.seq_len, and the longest
// context any model here can be given.
constexpr int64_t kMaxPositions = int64_t(1) << 24;

std::string with_key(std::string text, const std::string& key) {
  for (size_t at = text.find("{key}"); at != std::string::npos; at = text.find("{key}", at + key.size()))
    text.replace(at, 5, key);
  return text;
}

std::vector<int32_t> encode(const Tokenizer& tok, const std::string& text) {
  std::vector<uint32_t> ids;
  tok.encode(text, ids);
  return {ids.begin(), ids.end()};
}

// Σ_k log softmax(logits)[token], in double from the model's logits.
double log_prob(const std::vector<double>& logits, int32_t token) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (double l : logits) sum += std::exp(l - mx);
  return logits[size_t(token)] - mx - std::log(sum);
}

int32_t greedy_token(const std::vector<double>& logits) {
  Rng unused(0);
  return sample_token(logits, 0.0, 0, 1.0, unused);  // argmax, the lowest id on ties
}

// Decoded text on one line: valid UTF-8 kept, other bytes as \xNN, control characters escaped.
std::string one_line(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 0;
    bool ok = n > 0 && i + n <= s.size();
    for (size_t k = 1; ok && k < n; ++k) ok = (static_cast<unsigned char>(s[i + k]) >> 6) == 0x2;
    if (!ok) {
      out += fmt::format("\\x{:02x}", c);
      ++i;
    } else if (c == '\n') {
      out += "\\n", ++i;
    } else if (c == '\t') {
      out += "\\t", ++i;
    } else if (c == '\\') {
      out += "\\\\", ++i;
    } else if (c < 0x20 || c == 0x7f) {
      out += fmt::format("\\x{:02x}", c), ++i;
    } else {
      out.append(s, i, n), i += n;
    }
  }
  return out;
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

}  // namespace

void check_needle_options(const NeedleOptions& o) {
  if (o.lengths.empty()) fail("needle: --lengths is empty (expected context lengths in tokens, e.g. 1024,2048)");
  for (int64_t n : o.lengths)
    if (n < 2 || n > kMaxPositions)
      fail("needle: --lengths {} is out of range (expected 2 … 2^24 = {} tokens: positions are 32-bit in the "
           "kernels)",
           n, kMaxPositions);
  if (o.depths.empty()) fail("needle: --depths is empty (expected percentages in [0, 100], e.g. 0,50,100)");
  for (double d : o.depths)
    if (!(d >= 0 && d <= 100)) fail("needle: --depths {} is out of range (expected a percentage in [0, 100])", d);
  if (o.trials < 1) fail("needle: --trials must be >= 1 (got {})", o.trials);
  if (o.key_digits < 1 || o.key_digits > 18)
    fail("needle: --key-digits must be in [1, 18] (got {})", o.key_digits);
  const double keys = 9.0 * std::pow(10.0, double(o.key_digits - 1));  // integers of that many digits
  if (o.distractors < 0 || double(o.distractors) > keys - 1)
    fail("needle: --distractors must be in [0, {}] with --key-digits {} (got {})", int64_t(keys - 1), o.key_digits,
         o.distractors);
  if (o.needle.find("{key}") == std::string::npos)
    fail("needle: --needle must contain {{key}}, where the key goes (got \"{}\")", o.needle);
  if (o.answer.find("{key}") == std::string::npos)
    fail("needle: --answer must contain {{key}}, the key the model must produce (got \"{}\")", o.answer);
  if (o.question.find("{key}") != std::string::npos)
    fail("needle: --question must not contain {{key}} (it would give the answer away)");
}

std::vector<int32_t> load_needle_filler(const std::string& spec, uint32_t eot_id, int64_t vocab) {
  std::vector<int32_t> out;
  for (const std::string& path : list_shards(spec)) {
    const ShardReader r(path);
    if (int64_t(r.info().vocab_size) > vocab)
      fail("needle: filler shard {} has vocabulary {}, larger than the model's {} (a shard of another tokenizer?)",
           path, r.info().vocab_size, vocab);
    std::vector<int32_t> ids;
    const uint64_t n = r.info().n_tokens, chunk = uint64_t(1) << 20;
    for (uint64_t at = 0; at < n; at += chunk) {
      ids.resize(size_t(std::min(chunk, n - at)));
      r.read(at, ids.size(), ids.data());
      for (int32_t id : ids)
        if (uint32_t(id) != eot_id) out.push_back(id);
    }
  }
  return out;
}

NeedleTrial make_needle_trial(const NeedleSetup& s, int64_t length, double depth, int64_t trial) {
  const NeedleOptions& o = s.opt;
  DMAT_CHECK(s.tok != nullptr, "needle: no tokenizer");
  NeedleTrial t;
  t.length = length, t.depth = depth, t.trial = trial;
  // the key and the distractors: distinct integers of key_digits digits from (seed, trial)
  Rng rng(hash64(o.seed, uint64_t(trial), 0x6e6565646c65));
  const uint64_t lo = uint64_t(std::llround(std::pow(10.0, double(o.key_digits - 1)))), span = 9 * lo;
  std::set<uint64_t> seen;
  while (int64_t(t.keys.size()) < o.distractors + 1) {
    const uint64_t k = lo + rng.below(span);
    if (seen.insert(k).second) t.keys.push_back(std::to_string(k));
  }
  for (const std::string& k : t.keys) {
    t.answers.push_back(encode(*s.tok, with_key(o.answer, k)));
    if (t.answers.back().empty()) fail("needle: --answer \"{}\" encodes to no tokens", o.answer);
  }
  const std::vector<int32_t> needle = encode(*s.tok, with_key(o.needle, t.keys[0])),
                             question = encode(*s.tok, o.question);
  t.needle_tokens = int64_t(needle.size());
  const int64_t fixed = t.needle_tokens + int64_t(question.size());
  const int64_t longest = *std::max_element(o.lengths.begin(), o.lengths.end());
  if (length - fixed < 1)
    fail("needle: --lengths {} leaves no room for filler: the needle and the question take {} tokens", length, fixed);
  t.filler_tokens = length - fixed;
  // the filler's start: one per trial, with room for the longest context's filler
  const int64_t need = longest - fixed;
  if (int64_t(s.filler.size()) < need)
    fail("needle: the filler holds {} tokens (end-of-document tokens dropped), fewer than the {} the longest of "
         "--lengths needs; give a larger shard set with --filler or shorter --lengths",
         s.filler.size(), need);
  Rng start(hash64(o.seed, uint64_t(trial), 0x66696c6c6572));
  t.filler_start = int64_t(start.below(uint64_t(int64_t(s.filler.size()) - need + 1)));
  t.needle_pos = std::llround(depth / 100.0 * double(t.filler_tokens));
  const auto f = s.filler.begin() + t.filler_start;
  t.context.reserve(size_t(length));
  t.context.insert(t.context.end(), f, f + t.needle_pos);
  t.context.insert(t.context.end(), needle.begin(), needle.end());
  t.context.insert(t.context.end(), f + t.needle_pos, f + t.filler_tokens);
  t.context.insert(t.context.end(), question.begin(), question.end());
  DMAT_CHECK(int64_t(t.context.size()) == length, "needle: context of {} tokens for length {}", t.context.size(),
             length);
  return t;
}

NeedleScore score_needle_trial(const Model& m, Model::DecodeState& st, const NeedleTrial& t) {
  const int64_t N = int64_t(t.context.size());
  NeedleScore r;
  st.rewind(0);
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<double> first = m.decode(st, t.context.data(), N);  // predicts the answer's first token
  const auto t1 = std::chrono::steady_clock::now();
  // greedy: as many tokens as the right answer has
  const std::vector<int32_t>& answer = t.answers[0];
  std::vector<double> logits = first;
  for (size_t k = 0; k < answer.size(); ++k) {
    if (k > 0) logits = m.decode(st, &r.greedy.back(), 1);
    r.greedy.push_back(greedy_token(logits));
  }
  r.exact = r.greedy == answer;
  while (r.prefix_correct < int64_t(answer.size()) &&
         r.greedy[size_t(r.prefix_correct)] == answer[size_t(r.prefix_correct)])
    ++r.prefix_correct;
  // each candidate's log-likelihood, continuing from the end of the context
  for (const std::vector<int32_t>& cand : t.answers) {
    st.rewind(N);
    double lp = log_prob(first, cand[0]);
    for (size_t k = 1; k < cand.size(); ++k) lp += log_prob(m.decode(st, &cand[k - 1], 1), cand[k]);
    r.logprob.push_back(lp);
  }
  r.rank = 1;
  for (size_t i = 1; i < r.logprob.size(); ++i) r.rank += r.logprob[i] >= r.logprob[0];
  r.prefill_s = std::chrono::duration<double>(t1 - t0).count();
  r.answer_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  return r;
}

NeedleReport run_needle(const std::string& run_dir, const NeedleOptions& o,
                        const std::function<void(const NeedleRow&)>& on_row) {
  check_needle_options(o);
  DecodingRun run = open_run_for_decoding(run_dir, o.step, o.tokenizer, "needle");
  if (!run.tok)
    fail("needle: the needle, the question and the answer are text and need the run's tokenizer, but {}; name one "
         "with --tokenizer",
         run.why_no_tokenizer);
  const Config& cfg = run.cfg;
  if (int64_t(run.tok->vocab_size()) > cfg.model.vocab_size)
    fail("needle: tokenizer {} has {} tokens, more than the model's vocabulary of {} (not the run's tokenizer?)",
         run.tok->name(), run.tok->vocab_size(), cfg.model.vocab_size);
  set_cpu_threads(o.threads > 0 ? o.threads : cfg.run.threads, 1);
  NeedleSetup setup;
  setup.opt = o;
  setup.tok = run.tok.get();
  const std::string filler = o.filler.empty() ? cfg.data.val : o.filler;
  setup.filler = load_needle_filler(filler, run.tok->eot_id(), cfg.model.vocab_size);

  NeedleReport rep;
  rep.variant = cfg.model.attention.type;
  rep.checkpoint = run.ck.path;
  rep.step = run.ck.step;
  rep.train_seq_len = cfg.train.seq_len;
  std::vector<int64_t> beyond;
  for (int64_t n : o.lengths)
    if (n > cfg.train.seq_len) beyond.push_back(n);
  if (!beyond.empty())
    spdlog::warn("needle: --lengths {} exceed the {} positions the model was trained on (train.seq_len): allowed, "
                 "but RoPE extrapolates poorly to unseen distances, so a failure there measures extrapolation as "
                 "much as retrieval (those rows have beyond_train = 1)",
                 fmt::join(beyond, ","), cfg.train.seq_len);

  // one decoding state for every trial: the longest context and the longest candidate answer
  const int64_t longest = *std::max_element(o.lengths.begin(), o.lengths.end());
  int64_t answer_max = 1;
  for (int64_t k = 0; k < o.trials; ++k)
    for (const auto& a : make_needle_trial(setup, longest, 0, k).answers)
      answer_max = std::max(answer_max, int64_t(a.size()));
  Model model(cfg.model, DType::F32, Device::CPU);
  load_model_weights(model, run.ck.path + "/model.safetensors");
  auto state = model.start_decode(longest + answer_max);
  rep.cache = state->describe();
  spdlog::info("needle: checkpoint {} (step {}), {} filler tokens from {}; {} lengths × {} depths × {} trials, {} "
               "distractors; cache per layer: {}",
               run.ck.path, run.ck.step, setup.filler.size(), filler, o.lengths.size(), o.depths.size(), o.trials,
               o.distractors, rep.cache);

  for (int64_t n : o.lengths)
    for (int64_t k = 0; k < o.trials; ++k)
      for (double d : o.depths) {
        NeedleRow row;
        row.trial = make_needle_trial(setup, n, d, k);
        row.score = score_needle_trial(model, *state, row.trial);
        row.beyond_train = n > cfg.train.seq_len;
        row.greedy_text = one_line(run.tok->decode({row.score.greedy.begin(), row.score.greedy.end()}));
        spdlog::info("needle: length {} depth {:g}% trial {}: {} (greedy \"{}\", key {}), rank {} of {}, {:.2f} s",
                     n, d, k, row.score.exact ? "exact" : "wrong", row.greedy_text, row.trial.keys[0],
                     row.score.rank, row.trial.keys.size(), row.score.prefill_s + row.score.answer_s);
        if (on_row) on_row(row);
        rep.rows.push_back(std::move(row));
      }
  return rep;
}

namespace {

// One row's fields in the output's column order (needle.h, README).
nlohmann::ordered_json row_json(const NeedleReport& r, const NeedleRow& w, const std::string& run_dir) {
  const NeedleTrial& t = w.trial;
  const NeedleScore& s = w.score;
  double best = -INFINITY;
  for (size_t i = 1; i < s.logprob.size(); ++i) best = std::max(best, s.logprob[i]);
  nlohmann::ordered_json j;
  j["run"] = run_dir;
  j["variant"] = r.variant;
  j["step"] = r.step;
  j["length"] = t.length;
  j["depth"] = t.depth;
  j["trial"] = t.trial;
  j["needle_pos"] = t.needle_pos;
  j["depth_actual"] = 100.0 * double(t.needle_pos) / double(t.filler_tokens);
  j["filler_tokens"] = t.filler_tokens;
  j["filler_start"] = t.filler_start;
  j["key"] = t.keys[0];
  j["answer_tokens"] = int64_t(t.answers[0].size());
  j["greedy"] = w.greedy_text;
  j["exact"] = int(s.exact);
  j["prefix_correct"] = s.prefix_correct;
  j["logprob"] = s.logprob[0];
  j["best_distractor_logprob"] = s.logprob.size() > 1 ? nlohmann::ordered_json(best) : nlohmann::ordered_json();
  j["rank"] = s.rank;
  j["candidates"] = int64_t(s.logprob.size());
  j["beyond_train"] = int(w.beyond_train);
  j["prefill_s"] = s.prefill_s;
  j["answer_s"] = s.answer_s;
  return j;
}

}  // namespace

std::string needle_csv(const NeedleReport& r, const std::string& run_dir) {
  std::string out;
  bool header = true;
  for (const NeedleRow& w : r.rows) {
    const nlohmann::ordered_json j = row_json(r, w, run_dir);
    if (header) {
      std::string h;
      for (const auto& [k, v] : j.items()) {
        if (!h.empty()) h += ',';
        h += k;
      }
      out += h + "\n";
      header = false;
    }
    std::string line;
    for (const auto& [k, v] : j.items()) {
      const std::string f = v.is_string() ? v.get<std::string>() : v.is_null() ? std::string() : v.dump();
      if (!line.empty()) line += ',';
      line += csv_field(f);
    }
    out += line + "\n";
  }
  return out;
}

std::string needle_jsonl(const NeedleReport& r, const std::string& run_dir) {
  std::string out;
  for (const NeedleRow& w : r.rows)
    out += row_json(r, w, run_dir).dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
  return out;
}

}  // namespace dmat
