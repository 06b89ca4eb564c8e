// Needle retrieval (`dmatrain needle`, src/train/needle.h): the context is laid out as defined (the
// needle at the requested depth, the lengths exact, keys and filler from (seed, trial) only); the
// scoring on the decoding caches gives each candidate the log-likelihood the model's own loss gives
// those tokens after the context, for every variant, and counts greedy matches and ranks as defined;
// the command is deterministic, writes its rows and refuses bad options by name.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#include "train/needle.h"

namespace dmat {
namespace {

using test::run;
std::string bin() { return test::dmatrain_bin(); }

// Filler of byte tokens 128 … 250 in a fixed pattern: none is in the (ASCII) needle or question, so
// the needle's place in a context is where its first ASCII byte is.
std::vector<int32_t> pattern_filler(int64_t n) {
  std::vector<int32_t> f(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) f[size_t(i)] = int32_t(128 + (i * 37) % 123);
  return f;
}

std::vector<int32_t> encode(const Tokenizer& tok, const std::string& text) {
  std::vector<uint32_t> ids;
  tok.encode(text, ids);
  return {ids.begin(), ids.end()};
}

TEST(Needle, ContextPutsTheNeedleAtTheRequestedDepth) {
  const auto tok = load_tokenizer("byte");
  NeedleSetup s;
  s.tok = tok.get();
  s.opt.lengths = {200, 300};
  s.opt.trials = 3;
  s.opt.distractors = 5;
  s.opt.key_digits = 4;
  s.filler = pattern_filler(5000);
  for (int64_t trial = 0; trial < 3; ++trial)
    for (int64_t length : s.opt.lengths)
      for (double depth : {0.0, 25.0, 33.3, 50.0, 100.0}) {
        SCOPED_TRACE(testing::Message() << "trial " << trial << " length " << length << " depth " << depth);
        const NeedleTrial t = make_needle_trial(s, length, depth, trial);
        const std::vector<int32_t> needle = encode(*tok, "\nThe pass key is " + t.keys[0] + ". Remember it. " +
                                                             t.keys[0] + " is the pass key.\n");
        const std::vector<int32_t> question = encode(*tok, "\nWhat is the pass key? The pass key is");
        ASSERT_EQ(int64_t(t.context.size()), length);
        const int64_t F = length - int64_t(needle.size() + question.size());
        EXPECT_EQ(t.filler_tokens, F);
        EXPECT_EQ(t.needle_tokens, int64_t(needle.size()));
        EXPECT_EQ(t.needle_pos, std::llround(depth / 100 * double(F)));
        // the layout: filler before, the needle, the rest of the filler, the question
        const auto f = s.filler.begin() + t.filler_start;
        std::vector<int32_t> expect(f, f + t.needle_pos);
        expect.insert(expect.end(), needle.begin(), needle.end());
        expect.insert(expect.end(), f + t.needle_pos, f + F);
        expect.insert(expect.end(), question.begin(), question.end());
        EXPECT_EQ(t.context, expect);
        // where the needle is found: the first token below 128
        const auto at = std::find_if(t.context.begin(), t.context.end(), [](int32_t x) { return x < 128; });
        EXPECT_EQ(at - t.context.begin(), t.needle_pos);
        if (depth == 0) EXPECT_EQ(t.needle_pos, 0);
        if (depth == 100) EXPECT_EQ(t.needle_pos + t.needle_tokens, length - int64_t(question.size()));
        // the keys: distinct, of 4 digits; the answers their encoded " {key}", the right one first
        ASSERT_EQ(t.keys.size(), 6u);
        for (size_t i = 0; i < t.keys.size(); ++i) {
          EXPECT_EQ(t.keys[i].size(), 4u);
          EXPECT_NE(t.keys[i][0], '0');
          EXPECT_EQ(std::count(t.keys.begin(), t.keys.end(), t.keys[i]), 1);
          EXPECT_EQ(t.answers[i], encode(*tok, " " + t.keys[i]));
        }
        // a trial's key, distractors and filler start do not depend on the cell
        const NeedleTrial t0 = make_needle_trial(s, 200, 0, trial);
        EXPECT_EQ(t.keys, t0.keys);
        EXPECT_EQ(t.filler_start, t0.filler_start);
      }
  EXPECT_NE(make_needle_trial(s, 200, 0, 0).keys[0], make_needle_trial(s, 200, 0, 1).keys[0]);
  // another seed, other keys
  NeedleSetup s2 = s;
  s2.opt.seed = 1;
  EXPECT_NE(make_needle_trial(s2, 200, 0, 0).keys, make_needle_trial(s, 200, 0, 0).keys);
  // refusals naming what is wrong
  test::expect_error([&] { make_needle_trial(s, 90, 0, 0); }, {"--lengths 90 leaves no room for filler"});
  NeedleSetup small = s;
  small.filler.resize(100);
  test::expect_error([&] { make_needle_trial(small, 200, 0, 0); }, {"the filler holds 100 tokens", "--filler"});
}

ModelConfig tiny(const std::string& type) {
  ModelConfig c;
  c.vocab_size = 257;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 8;
  c.ffn_dim = 48;
  c.init_std = 0.3;
  c.attention.type = type;
  if (type == "swa") c.attention.swa.window = 16;
  if (type == "dma") c.attention.dma.window = 24;
  if (type == "mla") {
    c.n_kv_heads = 4;
    c.attention.mla = {.kv_rank = 8, .q_rank = 0, .rope_dim = 4, .nope_dim = 8, .v_dim = 6};
  }
  if (type == "nsa")
    c.attention.nsa = {.cmp_block = 8, .cmp_stride = 4, .sel_block = 8, .sel_count = 4, .window = 16, .cmp_hidden = 8};
  return c;
}

// −Σ loss of forward() over the answer's tokens after the context: the model's own log-likelihood.
double forward_logprob(Model& m, const std::vector<int32_t>& context, const std::vector<int32_t>& answer) {
  std::vector<int32_t> in = context, tg(context.size(), -1);
  for (size_t k = 0; k < answer.size(); ++k) {
    tg[tg.size() - 1] = answer[k];  // position |context| − 1 + k predicts answer[k]
    if (k + 1 < answer.size()) in.push_back(answer[k]), tg.push_back(-1);
  }
  return -m.forward(in.data(), tg.data(), 1, int64_t(in.size()), 0.0);
}

TEST(Needle, LikelihoodIsTheModelsLossOnTheAnswerTokens) {
  // f64 models: decoding runs the training loops' sums (mla: in its absorbed order) and the loss
  // differs from the needle's double log-softmax only in rounding, ~1e-15 relative; 1e-10 leaves
  // room for MLA's reordered sums. Then an f32 model as the command runs it: the loss kernel forms
  // its log-sum-exp in f32 (xent.cpp), the needle in double from the same logits: an ulp of a ~10
  // log-sum-exp per token, ~1e-6, against 1e-5 · (1 + |logprob|).
  const auto tok = load_tokenizer("byte");
  NeedleSetup s;
  s.tok = tok.get();
  s.opt.lengths = {150};
  s.opt.distractors = 3;
  s.opt.key_digits = 3;
  s.filler = pattern_filler(1000);
  for (const std::string type : {"mha", "swa", "dma", "mla", "nsa"})
    for (DType dt : {DType::F64, DType::F32}) {
      if (dt == DType::F32 && type != "mha") continue;
      SCOPED_TRACE(type + (dt == DType::F64 ? " f64" : " f32"));
      Model m(tiny(type), dt, Device::CPU);
      m.init_weights(3);
      auto st = m.start_decode(160);
      for (double depth : {0.0, 60.0}) {
        const NeedleTrial t = make_needle_trial(s, 150, depth, 1);
        const NeedleScore r = score_needle_trial(m, *st, t);
        ASSERT_EQ(r.logprob.size(), 4u);
        for (size_t i = 0; i < t.answers.size(); ++i) {
          const double ref = forward_logprob(m, t.context, t.answers[i]);
          EXPECT_NEAR(r.logprob[i], ref, (dt == DType::F64 ? 1e-10 : 1e-5) * (1 + std::abs(ref))) << "candidate " << i;
        }
        int64_t rank = 1;
        for (size_t i = 1; i < r.logprob.size(); ++i) rank += r.logprob[i] >= r.logprob[0];
        EXPECT_EQ(r.rank, rank);
      }
    }
}

TEST(Needle, GreedyAnswerAndRankAreScoredAsDefined) {
  // A trial whose right answer is the model's own greedy continuation (found by recomputing the
  // prefix with forward()) scores exact with every token correct; one whose answer differs in its
  // last token gets the prefix before it; a distractor equal to the answer ties, and ties count
  // against the answer.
  const auto tok = load_tokenizer("byte");
  NeedleSetup s;
  s.tok = tok.get();
  s.opt.lengths = {120};
  s.opt.distractors = 2;
  s.filler = pattern_filler(1000);
  Model m(tiny("nsa"), DType::F32, Device::CPU);
  m.init_weights(5);
  auto st = m.start_decode(130);
  NeedleTrial t = make_needle_trial(s, 120, 40, 0);
  std::vector<int32_t> seq = t.context, greedy;
  for (int k = 0; k < 4; ++k) {
    std::vector<int32_t> tg(seq.size(), -1);
    m.forward(seq.data(), tg.data(), 1, int64_t(seq.size()), 0.0);
    const Tensor lg = m.logits();
    const float* last = lg.as<float>() + (int64_t(seq.size()) - 1) * 257;
    greedy.push_back(int32_t(std::max_element(last, last + 257) - last));
    seq.push_back(greedy.back());
  }
  t.answers[0] = greedy;
  NeedleScore r = score_needle_trial(m, *st, t);
  EXPECT_EQ(r.greedy, greedy);
  EXPECT_TRUE(r.exact);
  EXPECT_EQ(r.prefix_correct, 4);
  t.answers[0].back() = (greedy.back() + 1) % 257;
  r = score_needle_trial(m, *st, t);
  EXPECT_FALSE(r.exact);
  EXPECT_EQ(r.prefix_correct, 3);
  // ranks: the answer against itself (a tie) and against a far less likely string
  t.answers = {greedy, greedy, {255, 255, 255, 255}};
  r = score_needle_trial(m, *st, t);
  EXPECT_EQ(r.logprob[0], r.logprob[1]);
  EXPECT_LT(r.logprob[2], r.logprob[0]);
  EXPECT_EQ(r.rank, 2);
  t.answers = {greedy, {255, 255, 255, 255}};
  EXPECT_EQ(score_needle_trial(m, *st, t).rank, 1);
}

TEST(Needle, OptionsOutOfRangeAreRefusedByName) {
  const NeedleOptions ok;
  check_needle_options(ok);
  auto bad = [&](auto change, std::initializer_list<std::string> parts) {
    NeedleOptions o = ok;
    change(o);
    test::expect_error([&] { check_needle_options(o); }, parts);
  };
  bad([](NeedleOptions& o) { o.lengths = {}; }, {"--lengths is empty"});
  bad([](NeedleOptions& o) { o.lengths = {1024, 1}; }, {"--lengths 1 is out of range"});
  bad([](NeedleOptions& o) { o.lengths = {int64_t(1) << 25}; }, {"--lengths 33554432", "2^24"});
  bad([](NeedleOptions& o) { o.depths = {50, 101}; }, {"--depths 101", "[0, 100]"});
  bad([](NeedleOptions& o) { o.depths = {-1}; }, {"--depths -1"});
  bad([](NeedleOptions& o) { o.trials = 0; }, {"--trials must be >= 1 (got 0)"});
  bad([](NeedleOptions& o) { o.key_digits = 0; }, {"--key-digits must be in [1, 18] (got 0)"});
  bad([](NeedleOptions& o) { o.key_digits = 1, o.distractors = 9; }, {"--distractors must be in [0, 8]"});
  bad([](NeedleOptions& o) { o.needle = "no key here"; }, {"--needle must contain {key}"});
  bad([](NeedleOptions& o) { o.answer = " 42"; }, {"--answer must contain {key}"});
  bad([](NeedleOptions& o) { o.question = "Is it {key}?"; }, {"--question must not contain {key}"});
}

// stdout and the rows of a CSV without the timing columns (prefill_s, answer_s: wall time).
std::vector<std::string> rows_without_times(const std::string& path) {
  std::vector<std::string> rows;
  std::istringstream in(test::file_bytes(path));
  std::string line;
  while (std::getline(in, line)) {
    for (int k = 0; k < 2; ++k) line = line.substr(0, line.rfind(','));
    rows.push_back(line);
  }
  return rows;
}

TEST(Needle, CommandIsDeterministicAndRefusesBadInput) {
  const std::string dir = test::temp_dir("needle_cli");
  const std::string data = test::prepare_bundled_data(dir);
  auto r = run(bin() + " train " + test::source_dir() + "/configs/tiny-nsa.json --set run.threads=2" + data +
               " --out " + dir + "/run --set train.steps=2 --set train.eval_interval=0 --set train.eval_batches=1");
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::string cmd = bin() + " needle " + dir + "/run --lengths 128,160 --depths 0,50,100 --trials 2 " +
                          "--distractors 4 --needle ' key {key}.' --question ' key?' ";
  r = run(cmd + "--out " + dir + "/a.csv");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("--lengths 160 exceed the 128 positions the model was trained on"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("greedy exact match (of 2 trials), nsa step 2"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("likelihood rank 1"), std::string::npos) << r.out;
  r = run(cmd + "--out " + dir + "/b.csv");
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::vector<std::string> a = rows_without_times(dir + "/a.csv");
  EXPECT_EQ(a, rows_without_times(dir + "/b.csv"));
  ASSERT_EQ(a.size(), 1u + 2 * 2 * 3);  // header, lengths × trials × depths
  EXPECT_EQ(a[0].rfind("run,variant,step,length,depth,trial,", 0), 0u) << a[0];
  // JSON lines: the same rows; beyond_train where length > train.seq_len
  r = run(cmd + "--out " + dir + "/c.jsonl");
  ASSERT_EQ(r.rc, 0) << r.out;
  std::vector<nlohmann::json> rows = test::read_jsonl(dir + "/c.jsonl");
  ASSERT_EQ(rows.size(), 12u);
  for (const auto& j : rows) {
    EXPECT_EQ(j["beyond_train"].get<int>(), j["length"].get<int64_t>() > 128 ? 1 : 0);
    EXPECT_EQ(j["candidates"].get<int64_t>(), 5);
    EXPECT_EQ(j["answer_tokens"].get<int64_t>(), 6);  // " " and 5 digits, byte tokens
    EXPECT_GE(j["rank"].get<int64_t>(), 1);
    EXPECT_LE(j["rank"].get<int64_t>(), 5);
  }
  EXPECT_EQ(rows[0]["needle_pos"].get<int64_t>(), 0);
  EXPECT_EQ(rows[2]["needle_pos"].get<int64_t>(), rows[2]["filler_tokens"].get<int64_t>());
  // refusals: an existing output, bad options named, text needs a tokenizer
  r = run(cmd + "--out " + dir + "/a.csv");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("a.csv already exists"), std::string::npos) << r.out;
  r = run(cmd + "--out " + dir + "/d.txt");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.out.find("--out must name a .csv or a .jsonl file"), std::string::npos) << r.out;
  r = run(bin() + " needle " + dir + "/run --depths 0,150");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("--depths 150 is out of range"), std::string::npos) << r.out;
  r = run(bin() + " needle " + dir + "/run --lengths 1K,abc");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.out.find("--lengths expects an integer (got \"abc\")"), std::string::npos) << r.out;
  r = run(bin() + " needle " + dir + "/run --lengths 64");
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("--lengths 64 leaves no room for filler"), std::string::npos) << r.out;
  r = run(bin() + " needle " + dir + "/run --trails 3");
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.out.find("unknown option --trails"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dmat
