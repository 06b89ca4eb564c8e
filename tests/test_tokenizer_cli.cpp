// `dmatrain tokenizer ...` and `dmatrain data prepare --tokenizer T.json` through the built CLI.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace fs = std::filesystem;
using dmat::test::expect_error;
using dmat::test::file_bytes;
using dmat::test::write_bytes;

namespace {

std::string q(const std::string& s) { return "'" + s + "'"; }

}  // namespace

TEST(TokenizerCli, TrainEncodeDecodePrepare) {
  const auto dir = dmat::test::temp_dir("tok_cli");
  const std::string bin = dmat::test::dmatrain_bin(), eng = dmat::test::source_dir() + "/data/english";
  const std::string tok = dir + "/tok.json";
  auto r = dmat::test::run(bin + " tokenizer train --vocab 600 --threads 2 --out " + q(tok) + " " + q(eng));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("vocab 600 (343 merges, 1 special)"), std::string::npos) << r.out;
  // Same inputs, one thread: the same file.
  r = dmat::test::run(bin + " tokenizer train --vocab 600 --threads 1 --out " + q(dir + "/tok1.json") + " " + q(eng));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(file_bytes(tok), file_bytes(dir + "/tok1.json"));
  // An existing file is not overwritten.
  const std::string before = file_bytes(tok);
  r = dmat::test::run(bin + " tokenizer train --vocab 700 --out " + q(tok) + " " + q(eng));
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("already exists"), std::string::npos) << r.out;
  EXPECT_EQ(file_bytes(tok), before);
  // encode | decode round trip, and --special.
  r = dmat::test::run(bin + " tokenizer encode --tokenizer " + q(tok) + " 'In the beginning, 1234!'");
  ASSERT_EQ(r.rc, 0) << r.out;
  const std::string ids = r.out.substr(0, r.out.find('\n'));
  r = dmat::test::run(bin + " tokenizer decode --tokenizer " + q(tok) + " " + ids);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(r.out, "In the beginning, 1234!");
  r = dmat::test::run(bin + " tokenizer encode --special --tokenizer " + q(tok) + " '<|endoftext|>'");
  EXPECT_EQ(r.out, "599\n");
  r = dmat::test::run(bin + " tokenizer info " + q(tok));
  EXPECT_NE(r.out.find("end token      599 \"<|endoftext|>\""), std::string::npos) << r.out;
  // Usage errors exit 2 with the cause.
  r = dmat::test::run(bin + " tokenizer train --out " + q(dir + "/x.json") + " " + q(eng));
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.out.find("--vocab"), std::string::npos) << r.out;
  r = dmat::test::run(bin + " tokenizer train --vocab 1000 --pretokenizer bert --out " + q(dir + "/x.json") + " " + q(eng));
  EXPECT_EQ(r.rc, 2);
  EXPECT_NE(r.out.find("llama3 or gpt2"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir + "/x.json"));
  // data prepare with it: uint16 shards of vocab 600, the manifest names the tokenizer.
  r = dmat::test::run(bin + " data prepare --tokenizer " + q(tok) + " --out " + q(dir + "/data") + " --val-fraction 0.03 " + q(eng));
  ASSERT_EQ(r.rc, 0) << r.out;
  const auto m = nlohmann::json::parse(file_bytes(dir + "/data/manifest.json"));
  EXPECT_EQ(m["tokenizer"]["vocab_size"], 600);
  EXPECT_EQ(m["tokenizer"]["path"], tok);
  r = dmat::test::run(bin + " data inspect " + q(dir + "/data"));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("decoded with"), std::string::npos) << r.out;
  // A tokenizer.json of another model type: a clear error, nothing written.
  std::ofstream(dir + "/wp.json") << R"({"model": {"type": "WordPiece", "vocab": {}}})";
  r = dmat::test::run(bin + " data prepare --tokenizer " + q(dir + "/wp.json") + " --out " + q(dir + "/data2") + " " + q(eng));
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.out.find("model type \"WordPiece\" is not supported"), std::string::npos) << r.out;
  EXPECT_FALSE(fs::exists(dir + "/data2/manifest.json"));
}
