// Config: includes, --set overrides, strict validation messages, derived defaults, round trip,
// and the shipped configs in configs/.
#include <chrono>
#include <cstdio>
#include <limits>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <stdlib.h>

#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "config/config.h"
#include "core/kernel_options.h"
#include "core/error.h"
#include "test_util.h"

namespace dmat {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

// The smallest valid config: everything else defaults.
json minimal() { return json{{"data", {{"train", "t"}, {"val", "v"}}}}; }

// The message of the dmat::Error thrown by f (a test failure when nothing is thrown).
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected dmat::Error, nothing was thrown";
  return "";
}

// The error from parsing the minimal config with `patch` merged in and `overrides` applied.
std::string error_for(const json& patch, const std::vector<std::string>& overrides = {}) {
  json j = minimal();
  if (!patch.is_null()) j.update(patch, /*merge_objects=*/true);  // keeps null values, unlike merge_patch
  return error_of([&] { parse_config(j, ".", overrides); });
}

void write(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

void expect_has(const std::string& msg, const std::vector<std::string>& pieces) {
  EXPECT_THAT(msg, HasSubstr("config: "));
  for (const auto& p : pieces) EXPECT_THAT(msg, HasSubstr(p));
}

// ---- defaults and derived values -------------------------------------------------------------
TEST(ConfigDefaults, DerivedValuesAreFilledIn) {
  Config c = parse_config(minimal());
  EXPECT_EQ(c.model.n_kv_heads, c.model.n_heads);
  EXPECT_EQ(c.model.head_dim, 128 / 4);
  EXPECT_EQ(c.model.ffn_dim, 384);  // ceil(8/3 * 128) = 342 -> 384
  EXPECT_EQ(c.run.dir, "runs/run");
  EXPECT_EQ(c.train.schedule, "cosine");
  EXPECT_EQ(c.model.attention.type, "mha");
  EXPECT_EQ(c.resolved, to_json(c));
  EXPECT_EQ(c.resolved["model"]["head_dim"], 32);
}

TEST(ConfigDefaults, FfnDimRoundsUpToMultipleOf64) {
  json j = minimal();
  j["model"] = {{"d_model", 768}, {"n_heads", 6}};
  EXPECT_EQ(parse_config(j).model.ffn_dim, 2048);  // exactly 8/3 * 768
  j["model"] = {{"d_model", 100}, {"n_heads", 2}};
  EXPECT_EQ(parse_config(j).model.ffn_dim, 320);  // ceil(266.67) = 267 -> 320
}

TEST(ConfigDefaults, ExplicitValuesAreKept) {
  json j = minimal();
  j["model"] = {{"n_heads", 4}, {"n_kv_heads", 2}, {"head_dim", 16}, {"ffn_dim", 100}};
  j["run"] = {{"name", "x"}, {"dir", "/tmp/elsewhere"}};
  Config c = parse_config(j);
  EXPECT_EQ(c.model.n_kv_heads, 2);
  EXPECT_EQ(c.model.head_dim, 16);
  EXPECT_EQ(c.model.ffn_dim, 100);
  EXPECT_EQ(c.run.dir, "/tmp/elsewhere");
}

TEST(ConfigDefaults, RunDirFollowsName) {
  json j = minimal();
  j["run"] = {{"name", "abc-1.2_x"}};
  EXPECT_EQ(parse_config(j).run.dir, "runs/abc-1.2_x");
}

TEST(ConfigDefaults, IntegralFloatsAreIntegers) {
  json j = minimal();
  j["train"] = {{"steps", 100.0}, {"seed", 7.0}};
  Config c = parse_config(j);
  EXPECT_EQ(c.train.steps, 100);
  EXPECT_EQ(c.train.seed, 7u);
}

TEST(ConfigDefaults, IntegersAreAcceptedForNumbers) {
  json j = minimal();
  j["train"] = {{"lr", 1}, {"grad_clip", 0}};
  Config c = parse_config(j);
  EXPECT_EQ(c.train.lr, 1.0);
  EXPECT_EQ(c.train.grad_clip, 0.0);
}

TEST(ConfigDefaults, LargeSeedSurvives) {
  json j = minimal();
  j["train"] = {{"seed", 18446744073709551615ull}};
  EXPECT_EQ(parse_config(j).train.seed, 18446744073709551615ull);
}

// ---- round trip ------------------------------------------------------------------------------
TEST(ConfigRoundTrip, ToJsonParsesBackToTheSameConfig) {
  json j = minimal();
  j["model"] = {{"d_model", 96}, {"n_heads", 3}, {"qk_norm", true}, {"residual_scale", true},
                {"rope_theta", 500000.0}, {"attention", {{"type", "swa"}, {"window", 17}}}};
  j["train"] = {{"lr", 3e-4}, {"seed", 99}, {"schedule", "wsd"}, {"warmup_frac", 0.1},
                {"final_lr_ratio", 0.0}, {"eps", 1e-10}, {"beta1", 0.8}};
  j["run"] = {{"name", "rt"}, {"device", "cpu"}, {"threads", 2}, {"keep_checkpoints", 0}};
  Config c = parse_config(j);
  json out = to_json(c);
  Config c2 = parse_config(out);
  EXPECT_EQ(to_json(c2), out);
  EXPECT_EQ(c2.resolved, c.resolved);
  EXPECT_EQ(c2.model.attention.swa.window, 17);
  EXPECT_EQ(c2.train.lr, 3e-4);
  EXPECT_EQ(c2.train.eps, 1e-10);
  EXPECT_TRUE(c2.model.qk_norm);
  // Through text too, as the resolved config is saved to a file.
  Config c3 = parse_config(json::parse(out.dump(2)));
  EXPECT_EQ(to_json(c3), out);
}

TEST(ConfigRoundTrip, ToJsonWritesEveryField) {
  json out = to_json(parse_config(minimal()));
  EXPECT_EQ(out.size(), 4u);
  EXPECT_EQ(out["model"].size(), 14u);  // 13 fields + attention
  // the chosen variant's keys only: mha has none besides its type
  EXPECT_EQ(out["model"]["attention"], json({{"type", "mha"}}));
  EXPECT_EQ(out["train"].size(), 23u);
  EXPECT_EQ(out["data"].size(), 2u);
  EXPECT_EQ(out["run"].size(), 9u);  // 8 fields + kernels
  EXPECT_EQ(out["run"]["kernels"].size(), kernel_knobs().size());
}

// ---- unknown keys ----------------------------------------------------------------------------
TEST(ConfigErrors, UnknownKeyNamesPathKnownKeysAndSuggestion) {
  std::string m = error_for({{"model", {{"atention", {{"type", "mha"}}}}}});
  expect_has(m, {"unknown key model.atention", "known keys in model:", "vocab_size", "d_model",
                 "did you mean model.attention"});
}

TEST(ConfigErrors, UnknownKeyEverywhere) {
  expect_has(error_for({{"modle", json::object()}}), {"unknown key modle", "did you mean model"});
  expect_has(error_for({{"train", {{"stepz", 3}}}}), {"unknown key train.stepz", "train.steps"});
  expect_has(error_for({{"data", {{"test", "x"}}}}), {"unknown key data.test", "train, val"});
  expect_has(error_for({{"run", {{"colour", "red"}}}}), {"unknown key run.colour", "log_interval"});
  expect_has(error_for({{"model", {{"attention", {{"widow", 3}}}}}}),
             {"unknown key model.attention.widow", "did you mean model.attention.window"});
}

// ---- attention variants: each has its own options object -----------------------------------------
TEST(ConfigAttention, EachVariantWritesOnlyItsOwnKeys) {
  json j = minimal();
  j["model"] = {{"attention", {{"type", "swa"}, {"window", 9}}}};
  EXPECT_EQ(to_json(parse_config(j))["model"]["attention"], json({{"type", "swa"}, {"window", 9}}));
  j["model"] = {{"attention", {{"type", "dma"}, {"window", 9}}}};
  const json dma = to_json(parse_config(j))["model"]["attention"];
  EXPECT_EQ(dma.size(), 7u);  // type, window, bias_form, local_window, a_init, dt_init_std, bias_lr_scale
  EXPECT_EQ(dma["window"], 9);
  EXPECT_EQ(dma["dt_init_std"], 0.02);  // resolved from model.init_std
}

TEST(ConfigAttention, KeysOfAnotherVariantNameTheVariantThatHasThem) {
  expect_has(error_for({{"model", {{"attention", {{"type", "swa"}, {"window", 4}, {"a_init", 1}}}}}}),
             {"model.attention.a_init must be absent for attention type swa (only dma has it; got 1)",
              "the keys of swa: type, window"});
  // an unknown key: the nearest key of any variant, and which variant has it
  expect_has(error_for({{"model", {{"attention", {{"type", "swa"}, {"widow", 4}}}}}}),
             {"unknown key model.attention.widow (known keys in model.attention for attention type swa: type, window)",
              "did you mean model.attention.window?"});
  expect_has(error_for({{"model", {{"attention", {{"type", "swa"}, {"window", 4}, {"bias_from", "exp"}}}}}}),
             {"unknown key model.attention.bias_from",
              "did you mean model.attention.bias_form (a key of attention type dma)?"});
  // the type is read first: an unknown type is named as such, whatever else the object holds
  expect_has(error_for({{"model", {{"attention", {{"type", "nope"}, {"window", 4}}}}}}),
             {"model.attention.type must be one of mha, swa, dma, mla, nsa (got \"nope\""});
}

// Run directories written before per-variant options hold every variant's keys at their defaults:
// they still load (resume, eval), and keys set to anything else are still refused.
TEST(ConfigAttention, SavedConfigsOfEarlierVersionsStillLoad) {
  json j = minimal();
  j["model"] = {{"attention",
                 {{"type", "swa"}, {"window", 16}, {"bias_form", "exp"}, {"local_window", 0}, {"a_init", 0.0},
                  {"dt_init_std", 0.0}, {"bias_lr_scale", 1.0}}}};
  EXPECT_THAT(error_of([&] { parse_config(j); }), HasSubstr("must be absent for attention type swa"));
  const Config c = parse_saved_config(j);
  EXPECT_EQ(c.model.attention.swa.window, 16);
  EXPECT_EQ(c.resolved["model"]["attention"], json({{"type", "swa"}, {"window", 16}}));
  j["model"]["attention"]["type"] = "mha";
  j["model"]["attention"]["window"] = 0;
  EXPECT_EQ(parse_saved_config(j).resolved["model"]["attention"], json({{"type", "mha"}}));
  j["model"]["attention"]["a_init"] = 0.5;  // not a default: a real setting the saved type cannot have
  EXPECT_THAT(error_of([&] { parse_saved_config(j); }),
              HasSubstr("model.attention.a_init must be absent for attention type mha"));
}

TEST(ConfigErrors, NoSuggestionForFarKeys) {
  std::string m = error_for({{"train", {{"zzzzzzzz", 1}}}});
  expect_has(m, {"unknown key train.zzzzzzzz"});
  EXPECT_THAT(m, ::testing::Not(HasSubstr("did you mean")));
}

// ---- wrong types -----------------------------------------------------------------------------
TEST(ConfigErrors, WrongTypes) {
  expect_has(error_for({{"train", {{"steps", "100"}}}}),
             {"train.steps must be an integer (got \"100\")"});
  expect_has(error_for({{"train", {{"steps", 100.5}}}}), {"train.steps must be an integer", "100.5"});
  expect_has(error_for({{"train", {{"steps", true}}}}), {"train.steps must be an integer (got true)"});
  expect_has(error_for({{"train", {{"lr", "fast"}}}}), {"train.lr must be a number (got \"fast\")"});
  expect_has(error_for({{"model", {{"tie_embeddings", 1}}}}),
             {"model.tie_embeddings must be true or false (got 1)"});
  expect_has(error_for({{"model", {{"qk_norm", "true"}}}}),
             {"model.qk_norm must be true or false (got \"true\")"});
  expect_has(error_for({{"run", {{"name", 5}}}}), {"run.name must be a string (got 5)"});
  expect_has(error_for({{"train", {{"seed", -1}}}}),
             {"train.seed must be a non-negative integer (got -1)"});
  expect_has(error_for({{"model", {{"d_model", nullptr}}}}), {"model.d_model", "(got null)"});
  expect_has(error_for({{"model", {{"d_model", 1e30}}}}), {"model.d_model must be an integer"});
}

TEST(ConfigErrors, SectionsMustBeObjects) {
  expect_has(error_for({{"model", 3}}), {"model must be an object (got 3)"});
  expect_has(error_for({{"train", {1, 2}}}), {"train must be an object (got [1,2])"});
  expect_has(error_for({{"model", {{"attention", "mha"}}}}),
             {"model.attention must be an object (got \"mha\")"});
  expect_has(error_of([] { parse_config(json::array()); }), {"must be a JSON object", "[]"});
}

// ---- ranges ----------------------------------------------------------------------------------
struct RangeCase {
  json patch;
  std::vector<std::string> pieces;
};

TEST(ConfigErrors, Ranges) {
  const std::vector<RangeCase> cases = {
      {{{"model", {{"vocab_size", 1}}}}, {"model.vocab_size must be >= 2 (got 1)"}},
      {{{"model", {{"d_model", 0}}}}, {"model.d_model must be >= 1 (got 0)"}},
      {{{"model", {{"n_layers", -2}}}}, {"model.n_layers must be >= 1 (got -2)"}},
      {{{"model", {{"n_heads", 0}}}}, {"model.n_heads must be >= 1 (got 0)"}},
      {{{"model", {{"n_kv_heads", 3}}}}, {"model.n_kv_heads must divide model.n_heads = 4 (got 3)"}},
      {{{"model", {{"n_kv_heads", 8}}}}, {"model.n_kv_heads must divide", "(got 8)"}},
      {{{"model", {{"n_kv_heads", -1}}}}, {"model.n_kv_heads must be >= 0", "(got -1)"}},
      {{{"model", {{"head_dim", 33}}}}, {"model.head_dim must be even", "(got 33)"}},
      {{{"model", {{"head_dim", -4}}}}, {"model.head_dim must be >= 0", "(got -4)"}},
      {{{"model", {{"d_model", 100}, {"n_heads", 3}}}},
       {"model.d_model = 100", "model.n_heads = 3", "set model.head_dim explicitly"}},
      {{{"model", {{"d_model", 36}, {"n_heads", 4}}}}, {"model.head_dim must be even", "(got 9)"}},
      {{{"model", {{"ffn_dim", -1}}}}, {"model.ffn_dim must be >= 0", "(got -1)"}},
      {{{"model", {{"rope_theta", 0}}}}, {"model.rope_theta must be > 0 (got 0"}},
      {{{"model", {{"norm_eps", -1e-6}}}}, {"model.norm_eps must be > 0 (got -1e-06)"}},
      {{{"model", {{"init_std", 0.0}}}}, {"model.init_std must be > 0 (got 0.0)"}},
      {{{"model", {{"attention", {{"type", "nsa2"}}}}}},
       {"model.attention.type must be one of mha, swa, dma, mla, nsa (got \"nsa2\")"}},
      {{{"model", {{"attention", {{"type", "swa"}}}}}},
       {"model.attention.window must be > 0 for attention type swa", "(got 0)"}},
      {{{"model", {{"attention", {{"type", "swa"}, {"window", -3}}}}}},
       {"model.attention.window must be > 0", "(got -3)"}},
      {{{"model", {{"attention", {{"type", "mha"}, {"window", 64}}}}}},
       {"model.attention.window must be absent for attention type mha (only swa, dma, nsa have it; got 64)",
        "the keys of mha: type"}},
      {{{"train", {{"steps", 0}}}}, {"train.steps must be >= 1 (got 0)"}},
      {{{"train", {{"batch_size", 0}}}}, {"train.batch_size must be >= 1 (got 0)"}},
      {{{"train", {{"seq_len", -5}}}}, {"train.seq_len must be >= 1 (got -5)"}},
      {{{"train", {{"grad_accum", 0}}}}, {"train.grad_accum must be >= 1 (got 0)"}},
      {{{"train", {{"lr", 0}}}}, {"train.lr must be > 0 (got 0"}},
      {{{"train", {{"lr", -0.001}}}}, {"train.lr must be > 0 (got -0.001)"}},
      {{{"train", {{"schedule", "linear"}}}},
       {"train.schedule must be one of constant, cosine, wsd (got \"linear\")"}},
      {{{"train", {{"warmup_frac", 1.0}}}}, {"train.warmup_frac must be in [0, 1) (got 1.0)"}},
      {{{"train", {{"warmup_frac", -0.1}}}}, {"train.warmup_frac must be in [0, 1) (got -0.1)"}},
      {{{"train", {{"decay_frac", 0}}}}, {"train.decay_frac must be in (0, 1] (got 0"}},
      {{{"train", {{"decay_frac", 1.5}}}}, {"train.decay_frac must be in (0, 1] (got 1.5)"}},
      {{{"train", {{"schedule", "wsd"}, {"warmup_frac", 0.5}, {"decay_frac", 0.6}}}},
       {"train.warmup_frac + train.decay_frac must be <= 1 for schedule wsd", "0.5", "0.6"}},
      {{{"train", {{"final_lr_ratio", 1.5}}}}, {"train.final_lr_ratio must be in [0, 1] (got 1.5)"}},
      {{{"train", {{"beta1", 1.0}}}}, {"train.beta1 must be in [0, 1) (got 1.0)"}},
      {{{"train", {{"beta2", -0.5}}}}, {"train.beta2 must be in [0, 1) (got -0.5)"}},
      {{{"train", {{"eps", 0}}}}, {"train.eps must be > 0 (got 0"}},
      {{{"train", {{"weight_decay", -0.1}}}}, {"train.weight_decay must be >= 0 (got -0.1)"}},
      {{{"train", {{"grad_clip", -1}}}}, {"train.grad_clip must be >= 0", "(got -1"}},
      {{{"train", {{"eval_interval", -1}}}}, {"train.eval_interval must be >= 0", "(got -1)"}},
      {{{"train", {{"eval_batches", -1}}}}, {"train.eval_batches must be >= 0", "(got -1)"}},
      {{{"train", {{"checkpoint_interval", -10}}}},
       {"train.checkpoint_interval must be >= 0", "(got -10)"}},
      {{{"run", {{"device", "tpu"}}}}, {"run.device must be one of auto, cpu, cuda (got \"tpu\")"}},
      {{{"run", {{"threads", -1}}}}, {"run.threads must be >= 0", "(got -1)"}},
      {{{"run", {{"log_interval", 0}}}}, {"run.log_interval must be >= 1 (got 0)"}},
      {{{"run", {{"keep_checkpoints", -1}}}}, {"run.keep_checkpoints must be >= 0", "(got -1)"}},
      {{{"run", {{"name", ""}}}}, {"run.name must be a non-empty name", "(got \"\")"}},
      {{{"run", {{"name", "a/b"}}}}, {"run.name must be", "(got \"a/b\")"}},
      {{{"run", {{"name", "my run"}}}}, {"run.name must be", "(got \"my run\")"}},
      {{{"run", {{"name", ".."}}}}, {"run.name must be", "(got \"..\")"}},
      {{{"data", {{"train", ""}}}}, {"data.train must be a non-empty path (got \"\")"}},
      {{{"data", {{"val", ""}}}}, {"data.val must be a non-empty path (got \"\")"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.patch.dump());
    expect_has(error_for(c.patch), c.pieces);
  }
}

TEST(ConfigErrors, RangeBoundariesAreAccepted) {
  json j = minimal();
  j["model"] = {{"vocab_size", 2}, {"d_model", 8}, {"n_heads", 2}, {"n_kv_heads", 1}};
  j["train"] = {{"warmup_frac", 0.0}, {"decay_frac", 1.0}, {"final_lr_ratio", 1.0},
                {"beta1", 0.0}, {"weight_decay", 0}, {"grad_clip", 0}, {"eval_interval", 0},
                {"checkpoint_interval", 0}};
  j["run"] = {{"threads", 0}, {"keep_checkpoints", 0}, {"log_interval", 1}};
  EXPECT_NO_THROW(parse_config(j));
  j["train"] = {{"schedule", "wsd"}, {"warmup_frac", 0.25}, {"decay_frac", 0.75}};
  EXPECT_NO_THROW(parse_config(j));
  // Outside wsd, warmup + decay > 1 is allowed (decay_frac is unused).
  j["train"] = {{"schedule", "cosine"}, {"warmup_frac", 0.5}, {"decay_frac", 0.6}};
  EXPECT_NO_THROW(parse_config(j));
}

TEST(ConfigErrors, DataIsRequired) {
  expect_has(error_of([] { parse_config(json::object()); }), {"data is required"});
  expect_has(error_of([] { parse_config(json{{"data", {{"train", "t"}}}}); }),
             {"data.val is required"});
  expect_has(error_of([] { parse_config(json{{"data", {{"val", "v"}}}}); }),
             {"data.train is required"});
}

// ---- size limits -----------------------------------------------------------------------------
// Sizes whose arithmetic wrapped further on (a crash in the GEMM, in attention backward, a negative
// memory estimate, `info` hanging for minutes) are config errors naming the key and the bound, found
// at once, before anything is sized.
TEST(ConfigLimits, HugeDimensionsAndProductsAreRefusedFast) {
  const int64_t big = std::numeric_limits<int64_t>::max();
  const std::vector<RangeCase> cases = {
      {{{"model", {{"vocab_size", int64_t(1) << 57}}}},
       {"model.vocab_size must be <= 2^31 = 2147483648", "(got 144115188075855872)"}},
      {{{"model", {{"attention", {{"type", "swa"}, {"window", big}}}}}},
       {"model.attention.window must be <= 2147483647", "(got 9223372036854775807)"}},
      {{{"model", {{"attention", {{"type", "dma"}, {"window", 8}, {"local_window", big}}}}}},
       {"model.attention.local_window must be <= 2147483647"}},
      {{{"train", {{"seq_len", big}}}}, {"train.seq_len must be <= 2^24", "(got 9223372036854775807)"}},
      {{{"train", {{"batch_size", big}}}}, {"train.batch_size must be <= 2^20", "(got 9223372036854775807)"}},
      {{{"model", {{"n_layers", 1000000}}}}, {"model.n_layers must be <= 2^12 = 4096", "(got 1000000)"}},
      {{{"model", {{"d_model", int64_t(1) << 50}}}}, {"model.d_model must be <= 2^16"}},
      {{{"model", {{"n_heads", 100000}}}}, {"model.n_heads must be <= 2^12"}},
      {{{"model", {{"ffn_dim", int64_t(1) << 40}}}}, {"model.ffn_dim must be <= 2^20"}},
      {{{"train", {{"steps", big}}}}, {"train.steps must be <= 2^40"}},
      {{{"run", {{"threads", int64_t(1) << 40}}}}, {"run.threads must be <= 2^16"}},
      {{{"run", {{"name", std::string(300, 'a')}}}}, {"run.name must be at most 255 characters"}},
      // each factor inside its bound, the product not
      {{{"train", {{"batch_size", 1 << 16}, {"seq_len", 1 << 16}}}},
       {"train.batch_size × train.seq_len = 65536 × 65536 (tokens per micro-batch) must be <= 2^31"}},
      {{{"train", {{"steps", int64_t(1) << 39}, {"batch_size", 1 << 10}, {"seq_len", 1 << 10}}}},
       {"(tokens per rank) must be <= 2^50"}},
      {{{"model", {{"vocab_size", int64_t(1) << 31}, {"d_model", 1 << 16}, {"n_heads", 512}}}},
       {"the parameter count", "must be <= 2^40"}},
      {{{"model", {{"n_layers", 4096}}}, {"train", {{"batch_size", 1 << 12}, {"seq_len", 1 << 18}}}},
       {"the activations per micro-batch", "must be <= 2^46"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.patch.dump().substr(0, 200));
    const auto t0 = std::chrono::steady_clock::now();
    expect_has(error_for(c.patch), c.pieces);
    EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  }
  // the largest values of each bound are accepted
  json j = minimal();
  j["model"] = {{"vocab_size", int64_t(1) << 31}, {"d_model", 64}, {"n_layers", 4096}, {"n_heads", 4},
                {"attention", {{"type", "swa"}, {"window", (int64_t(1) << 31) - 1}}}};
  j["train"] = {{"seq_len", 1 << 24}, {"batch_size", 1}};
  EXPECT_NO_THROW(parse_config(j));
}

// Library exceptions reach the user with the file or key and what was expected.
TEST(ConfigLimits, NumbersBeyondTheDoubleRangeNameTheFileOrKey) {
  std::string d = test::temp_dir("config_1e400");
  write(d + "/big.json", "{\n  \"data\": {\"train\": \"t\", \"val\": \"v\"},\n  \"train\": {\"lr\": 1e400}\n}\n");
  expect_has(error_of([&] { load_config(d + "/big.json"); }), {"big.json:3", "must fit a double", "1e400"});
  expect_has(error_for({}, {"train.lr=1e400"}), {"train.lr must fit a double", "1e400"});
}

// Found by fuzz_config (tests/fuzz/corpus/config/crash-set-not-utf8): --set text that is not UTF-8
// became a JSON string, and the error message about it threw the JSON library's type_error 316
// instead (the saved config.json could not have been written either).
TEST(ConfigOverrides, TextThatIsNotUtf8IsAnErrorNamingTheOverride) {
  expect_has(error_for({}, {"model.vocab_size=\xcf\xce" "4"}),
             {"override \"model.vocab_size=\xef\xbf\xbd\xef\xbf\xbd" "4\" is not UTF-8 text"});
  expect_has(error_for({}, {"data.train=runs/\xff"}), {"override \"data.train=runs/", "is not UTF-8 text"});
  EXPECT_EQ(parse_config(minimal(), ".", {"data.train=caf\xc3\xa9"}).data.train, "caf\xc3\xa9");
}

// ---- --set overrides -------------------------------------------------------------------------
TEST(ConfigOverrides, ValuesAreParsedAsJsonElseString) {
  Config c = parse_config(minimal(), ".",
                          {"train.lr=3e-4", "train.steps=77", "run.name=foo",
                           "model.tie_embeddings=true", "model.attention.type=swa",
                           "model.attention.window=64", "train.schedule=\"wsd\""});
  EXPECT_EQ(c.train.lr, 3e-4);
  EXPECT_EQ(c.train.steps, 77);
  EXPECT_EQ(c.run.name, "foo");
  EXPECT_EQ(c.run.dir, "runs/foo");
  EXPECT_TRUE(c.model.tie_embeddings);
  EXPECT_EQ(c.model.attention.type, "swa");
  EXPECT_EQ(c.model.attention.swa.window, 64);
  EXPECT_EQ(c.train.schedule, "wsd");
}

TEST(ConfigOverrides, StringKeysTakeTheTextAsIs) {
  Config c = parse_config(minimal(), ".", {"run.name=123", "data.train=a=b", "data.val=true"});
  EXPECT_EQ(c.run.name, "123");
  EXPECT_EQ(c.data.train, "a=b");  // split at the first '='
  EXPECT_EQ(c.data.val, "true");
}

TEST(ConfigOverrides, WholeObjectAndLaterWins) {
  Config c = parse_config(minimal(), ".",
                          {R"(model.attention={"type":"swa","window":8})", "train.steps=5",
                           "train.steps=6"});
  EXPECT_EQ(c.model.attention.swa.window, 8);
  EXPECT_EQ(c.train.steps, 6);
}

TEST(ConfigOverrides, Errors) {
  expect_has(error_for({}, {"model.atention.type=swa"}),
             {"unknown key model.atention", "did you mean model.attention"});
  expect_has(error_for({}, {"train.bogus=1"}), {"unknown key train.bogus"});
  expect_has(error_for({}, {"train.steps=abc"}), {"train.steps must be an integer (got \"abc\")"});
  expect_has(error_for({}, {"train.lr=-1"}), {"train.lr must be > 0 (got -1"});
  expect_has(error_for({}, {"include=x.json"}), {"include cannot be set with --set", "x.json"});
  expect_has(error_for({}, {"no_equals_sign"}), {"no_equals_sign", "key.path=value"});
  expect_has(error_for({}, {"=3"}), {"key.path=value"});
  expect_has(error_for({}, {"train..lr=3"}), {"empty part", "train..lr"});
  expect_has(error_for({{"train", {{"lr", 0.1}}}}, {"train.lr.x=3"}),
             {"train.lr is not an object (got 0.1)", "train.lr.x=3"});
  // A default-valued key that the file does not set: the new object fails the type check.
  expect_has(error_for({}, {"train.lr.x=3"}), {"train.lr must be a number (got {\"x\":3})"});
}

// ---- includes --------------------------------------------------------------------------------
TEST(ConfigInclude, ChainAndPrecedence) {
  std::string d = test::temp_dir("config_include_chain");
  fs::create_directories(d + "/base/deeper");
  write(d + "/base/deeper/root.json",
        R"({"model": {"d_model": 64, "n_layers": 3, "n_heads": 2},
            "train": {"lr": 0.1, "steps": 10, "seed": 5},
            "data": {"train": "root_t", "val": "root_v"}})");
  write(d + "/base/mid.json",
        R"({"include": "deeper/root.json", "model": {"n_layers": 4}, "train": {"lr": 0.2}})");
  write(d + "/other.json", R"({"train": {"seed": 6, "steps": 11}})");
  write(d + "/top.json",
        R"({"include": ["base/mid.json", "other.json"], "train": {"lr": 0.3}, "run": {"name": "top"}})");
  Config c = load_config(d + "/top.json", {"train.steps=12"});
  EXPECT_EQ(c.model.d_model, 64);     // from the deepest file
  EXPECT_EQ(c.model.n_layers, 4);     // mid overrides root
  EXPECT_EQ(c.model.n_heads, 2);      // objects merge key by key
  EXPECT_EQ(c.train.lr, 0.3);         // the including file wins
  EXPECT_EQ(c.train.seed, 6u);        // later include wins over earlier
  EXPECT_EQ(c.train.steps, 12);       // --set wins over everything
  EXPECT_EQ(c.data.train, "root_t");
  EXPECT_EQ(c.run.name, "top");
  EXPECT_FALSE(c.resolved.contains("include"));
}

TEST(ConfigInclude, ParseConfigResolvesRelativeToBaseDir) {
  std::string d = test::temp_dir("config_include_base_dir");
  write(d + "/b.json", R"({"data": {"train": "x", "val": "y"}, "train": {"steps": 9}})");
  Config c = parse_config(json{{"include", "b.json"}}, d);
  EXPECT_EQ(c.train.steps, 9);
  EXPECT_EQ(c.data.val, "y");
}

TEST(ConfigInclude, CycleNamesTheChain) {
  std::string d = test::temp_dir("config_include_cycle");
  write(d + "/a.json", R"({"include": "b.json"})");
  write(d + "/b.json", R"({"include": "c.json"})");
  write(d + "/c.json", R"({"include": "a.json"})");
  std::string m = error_of([&] { load_config(d + "/a.json"); });
  expect_has(m, {"include cycle", "a.json -> ", "b.json -> ", "c.json -> ", "a.json"});
  write(d + "/self.json", R"({"include": "self.json"})");
  expect_has(error_of([&] { load_config(d + "/self.json"); }), {"include cycle", "self.json"});
}

TEST(ConfigInclude, DiamondIsNotACycle) {
  std::string d = test::temp_dir("config_include_diamond");
  write(d + "/common.json", R"({"data": {"train": "x", "val": "y"}})");
  write(d + "/l.json", R"({"include": "common.json", "train": {"steps": 3}})");
  write(d + "/r.json", R"({"include": "common.json", "train": {"lr": 0.5}})");
  write(d + "/top.json", R"({"include": ["l.json", "r.json"]})");
  Config c = load_config(d + "/top.json");
  EXPECT_EQ(c.train.steps, 3);
  EXPECT_EQ(c.train.lr, 0.5);
}

TEST(ConfigInclude, MissingIncludeNamesFileAndChain) {
  std::string d = test::temp_dir("config_include_missing");
  write(d + "/a.json", R"({"include": "b.json"})");
  write(d + "/b.json", R"({"include": "nope.json"})");
  std::string m = error_of([&] { load_config(d + "/a.json"); });
  expect_has(m, {"nope.json", "does not exist", "a.json -> ", "b.json"});
}

TEST(ConfigInclude, BadIncludeValue) {
  expect_has(error_for({{"include", 3}}), {"include must be", "(got 3)"});
  expect_has(error_for({{"include", {"a.json", 1}}}), {"include must be", "[\"a.json\",1]"});
  expect_has(error_for({{"model", {{"include", "x.json"}}}}), {"unknown key model.include"});
  expect_has(error_for({{"includes", "x.json"}}), {"unknown key includes", "did you mean include?"});
}

// ---- files -----------------------------------------------------------------------------------
TEST(ConfigFile, MissingFile) {
  std::string d = test::temp_dir("config_missing_file");
  expect_has(error_of([&] { load_config(d + "/absent.json"); }), {"absent.json", "does not exist"});
}

TEST(ConfigFile, ParseErrorNamesFileAndPosition) {
  std::string d = test::temp_dir("config_parse_error");
  write(d + "/broken.json", "{\n  \"train\": {\"steps\": 3,}\n}\n");
  std::string m = error_of([&] { load_config(d + "/broken.json"); });
  expect_has(m, {"cannot parse", "broken.json", "line 2"});
  // In an included file, the chain is named too.
  write(d + "/top.json", R"({"include": "broken.json"})");
  expect_has(error_of([&] { load_config(d + "/top.json"); }), {"broken.json", "top.json"});
}

TEST(ConfigFile, TopLevelMustBeObject) {
  std::string d = test::temp_dir("config_not_object");
  write(d + "/arr.json", "[1, 2]");
  expect_has(error_of([&] { load_config(d + "/arr.json"); }), {"arr.json", "JSON object"});
}

TEST(ConfigFile, CommentKeyIsIgnored) {
  json j = minimal();
  j["comment"] = {"anything", "goes"};
  Config c = parse_config(j);
  EXPECT_FALSE(c.resolved.contains("comment"));
}

// ---- shipped configs -------------------------------------------------------------------------
// Every shipped run config loads and round-trips, except the ladder's specs (ladder.json: read by
// scripts/ladder.py, not a run config), and names an attention variant this build has.
TEST(ConfigShipped, AllLoad) {
  fs::path dir = fs::path(test::source_dir()) / "configs";
  int n = 0;
  std::map<std::string, int> by_type;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file() || e.path().extension() != ".json") continue;
    if (e.path().parent_path().filename() == "base" || e.path().filename() == "ladder.json") continue;
    SCOPED_TRACE(e.path().string());
    EXPECT_NO_THROW({
      Config c = load_config(e.path().string());
      EXPECT_EQ(to_json(parse_config(c.resolved)), c.resolved);
      ++by_type[c.model.attention.type];
    });
    ++n;
  }
  std::string types;
  for (const auto& [t, k] : by_type) types += fmt::format(" {} {}", t, k);
  std::printf("%d shipped configs load; attention types:%s\n", n, types.c_str());
  EXPECT_GE(n, 4);
  for (const char* t : {"mha", "swa", "dma", "mla", "nsa"}) EXPECT_GE(by_type[t], 3) << t;
}

TEST(ConfigShipped, ShapesMatchThePaper) {
  fs::path dir = fs::path(test::source_dir()) / "configs";
  Config tiny = load_config((dir / "tiny.json").string());
  EXPECT_EQ(tiny.model.vocab_size, 257);
  EXPECT_EQ(tiny.model.n_kv_heads, 2);
  EXPECT_EQ(tiny.train.steps, 300);
  EXPECT_EQ(tiny.train.schedule, "wsd");
  EXPECT_EQ(tiny.data.train, "build/data/english/train");
  EXPECT_EQ(tiny.run.name, "tiny");

  Config p80 = load_config((dir / "paper-80m.json").string());
  EXPECT_EQ(p80.model.d_model, 768);
  EXPECT_EQ(p80.model.n_layers, 12);
  EXPECT_EQ(p80.model.n_heads, 6);
  EXPECT_EQ(p80.model.n_kv_heads, 3);
  EXPECT_EQ(p80.model.head_dim, 128);
  EXPECT_EQ(p80.model.ffn_dim, 2304);
  EXPECT_EQ(p80.model.vocab_size, 32768);
  EXPECT_FALSE(p80.model.tie_embeddings);
  EXPECT_EQ(p80.train.seq_len, 2048);
  EXPECT_EQ(p80.train.batch_size * p80.train.grad_accum * p80.train.seq_len, 131072);
  EXPECT_EQ(p80.train.lr, 3e-3);
  EXPECT_EQ(p80.train.weight_decay, 0.01);
  // 1.73B tokens (13199 steps, rounded to 13200).
  EXPECT_NEAR(double(p80.train.steps) * 131072, 1.73e9, 2 * 131072.0);

  Config p200 = load_config((dir / "paper-200m.json").string());
  EXPECT_EQ(p200.model.d_model, 1024);
  EXPECT_EQ(p200.model.n_layers, 16);
  EXPECT_EQ(p200.model.n_heads, 8);
  EXPECT_EQ(p200.model.n_kv_heads, 4);
  EXPECT_EQ(p200.model.ffn_dim, 3072);
  EXPECT_EQ(p200.train.lr, 2e-3);
  const int64_t tok200 = p200.train.batch_size * p200.train.grad_accum * p200.train.seq_len;
  EXPECT_EQ(tok200, 196608);
  EXPECT_NEAR(double(p200.train.steps) * tok200, 3.99e9, double(tok200) * 60);

  Config m20 = load_config((dir / "20m.json").string());
  EXPECT_EQ(m20.model.d_model, 256);
  EXPECT_EQ(m20.model.n_layers, 8);
  EXPECT_EQ(m20.model.n_heads, 2);
  EXPECT_EQ(m20.model.n_kv_heads, 1);
  EXPECT_EQ(m20.model.head_dim, 128);
  EXPECT_EQ(m20.model.ffn_dim, 768);
  EXPECT_EQ(m20.train.batch_size, 64);
  EXPECT_EQ(m20.train.seq_len, 2048);

  // The attention variants of the paper's shapes change model.attention and the run name only.
  for (const char* size : {"80m", "200m"}) {
    const Config mha = load_config((dir / fmt::format("paper-{}.json", size)).string());
    for (const char* variant : {"dma", "swa", "mla"}) {
      const std::string name = fmt::format("paper-{}-{}", size, variant);
      const Config c = load_config((dir / (name + ".json")).string());
      EXPECT_EQ(c.model.attention.type, variant) << name;
      if (std::string(variant) == "mla") {
        EXPECT_EQ(c.model.attention.mla.kv_rank, c.model.d_model / 4) << name;  // the paper's d_c
      } else {
        EXPECT_EQ(c.resolved["model"]["attention"]["window"], 1024) << name;
      }
      EXPECT_EQ(c.run.name, name);
      nlohmann::json a = c.resolved, b = mha.resolved;
      for (auto* j : {&a, &b}) {
        (*j)["model"].erase("attention");
        (*j)["run"].erase("name");
        (*j)["run"].erase("dir");  // follows the name
        (*j).erase("comment");
      }
      EXPECT_EQ(a, b) << name << " differs from paper-" << size << " outside model.attention";
    }
  }
}

}  // namespace
}  // namespace dmat

// ---- run.kernels (core/kernel_options.h) ---------------------------------------------------------
namespace dmat {
namespace {

TEST(ConfigKernels, DefaultsAreWrittenAndReadBack) {
  const Config c = parse_config(minimal());
  EXPECT_EQ(c.run.kernels, KernelOptions{});
  const json& k = c.resolved["run"]["kernels"];
  EXPECT_EQ(k["attn_path"], "auto");
  EXPECT_EQ(k["attn_order"], "lpt");
  EXPECT_EQ(k["attn_side_stream"], 2);
  EXPECT_EQ(k["dma_thr_seg"], 256);
  EXPECT_EQ(k["gemm_algo"], "heuristic");
  EXPECT_EQ(parse_config(c.resolved).run.kernels, c.run.kernels);
}

TEST(ConfigKernels, ValuesAsStringsNumbersOrBooleans) {
  json j = minimal();
  j["run"]["kernels"] = {{"attn_order", "lpt2"}, {"attn_side_stream", 0}, {"attn_wg_tma", false},
                         {"dma_dense", "1"},     {"dma_thr_seg", 512},    {"gemm_algo", "tuned"},
                         {"peak_tflops", 495.5}, {"attn_path", "mma"}};
  const Config c = parse_config(j);
  const KernelOptions& o = c.run.kernels;
  EXPECT_EQ(o.attn_order, 2);
  EXPECT_EQ(o.attn_side_stream, 0);
  EXPECT_FALSE(o.attn_wg_tma);
  EXPECT_EQ(o.dma_dense, DmaDenseOption::always);
  EXPECT_EQ(o.dma_thr_seg, 512);
  EXPECT_TRUE(o.gemm_tuned);
  EXPECT_EQ(o.peak_tflops, 495.5);
  EXPECT_EQ(o.attn_path, AttnPathOption::mma);
  EXPECT_EQ(parse_config(c.resolved).run.kernels, o);
  EXPECT_EQ(parse_config(minimal(), ".", {"run.kernels.attn_order=launch"}).run.kernels.attn_order, 0);
}

TEST(ConfigKernels, UnknownKeysAndValuesAreErrors) {
  json j = minimal();
  j["run"]["kernels"] = {{"attn_ordr", "lpt"}};
  expect_has(error_of([&] { parse_config(j); }), {"run.kernels", "attn_ordr", "did you mean", "attn_order"});
  j["run"]["kernels"] = {{"attn_path", "fast"}};
  expect_has(error_of([&] { parse_config(j); }),
             {"config: run.kernels.attn_path must be one of auto, mma, wgmma (got 'fast')"});
  j["run"]["kernels"] = {{"dma_thr_seg", 64}};
  expect_has(error_of([&] { parse_config(j); }), {"run.kernels.dma_thr_seg must be one of 256, 512, 128"});
  j["run"]["kernels"] = {{"peak_tflops", -1}};
  expect_has(error_of([&] { parse_config(j); }), {"run.kernels.peak_tflops", ">= 0"});
}

TEST(ConfigKernels, EnvironmentOverridesAtLoadNamingChanges) {
  const std::string d = test::temp_dir("config_kernels_env");
  write(d + "/c.json", R"({"data": {"train": "t", "val": "v"}, "run": {"kernels": {"attn_order": "lpt4"}}})");
  ::setenv("DMAT_ATTN_ORDER", "launch", 1);
  ::setenv("DMAT_GEMM_ALGO", "", 1);  // empty: unset
  const Config c = load_config(d + "/c.json");
  EXPECT_EQ(c.run.kernels.attn_order, 0);
  EXPECT_FALSE(c.run.kernels.gemm_tuned);
  EXPECT_EQ(c.resolved["run"]["kernels"]["attn_order"], "launch");
  EXPECT_EQ(parse_config(json::parse(R"({"data": {"train": "t", "val": "v"}})")).run.kernels.attn_order, -1)
      << "parse_config applies no environment";
  KernelOptions o;
  const auto lines = apply_kernel_env(o);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0], "run.kernels.attn_order: lpt -> launch (DMAT_ATTN_ORDER)");
  ::setenv("DMAT_ATTN_ORDER", "Launch", 1);
  const std::string m = error_of([&] { load_config(d + "/c.json"); });
  EXPECT_THAT(m, HasSubstr("DMAT_ATTN_ORDER must be one of lpt, launch, lpt1"));
  EXPECT_THAT(m, HasSubstr("(got 'Launch')"));
  ::unsetenv("DMAT_ATTN_ORDER");
  ::unsetenv("DMAT_GEMM_ALGO");
}

}  // namespace
}  // namespace dmat
