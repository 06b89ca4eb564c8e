// `dmatrain tokenizer ...`: train a byte-level BPE, encode/decode with one, describe one, measure speed.
// Exit codes as for the other commands: 0 ok, 1 failure (one-line cause on stderr), 2 bad usage.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <spdlog/spdlog.h>

#include "core/error.h"
#include "data/documents.h"
#include "tokenizer/bpe.h"
#include "tokenizer/bpe_train.h"

namespace dmat::cli {

namespace {

struct TokUsage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kTokenizerHelp = R"(usage: dmatrain tokenizer train --vocab N --out TOKENIZER.json [--special TOKEN ...] [--pretokenizer llama3|gpt2]
                                [--min-frequency N] [--threads N] [--include GLOB ...] [--exclude GLOB ...]
                                [--overwrite] INPUTS...
       dmatrain tokenizer encode --tokenizer T.json [--special] (--file F | TEXT)
       dmatrain tokenizer decode --tokenizer T.json ID...
       dmatrain tokenizer info T.json
       dmatrain tokenizer bench --tokenizer T.json [--threads N] [--mb N] [--include GLOB ...] INPUTS...

train: learns a byte-level BPE of N tokens (256 bytes + merges + special tokens) from the documents of
  INPUTS (files, directories, .jsonl: the same reading rules as `data prepare`) and writes a Hugging Face
  tokenizer.json. --special may be repeated; the first special token ends every document in `data
  prepare` (default: <|endoftext|>). --pretokenizer: the LLaMA-3 regex split (default; digits in groups
  of up to 3) or GPT-2's. Deterministic: same inputs and options, same file, whatever --threads.
  Refuses to overwrite an existing file unless --overwrite.
encode: prints the ids of TEXT (or of the bytes of file F), space-separated. --special: added-token
  strings in the text become their ids (as HF tokenizers do); without it they are ordinary text.
decode: writes the bytes of the ids to stdout.
info: vocabulary size, merges, pre-tokenizer, end-of-document token, hash.
bench: encoding throughput on the documents of INPUTS (at most --mb MB, default 100, read into memory
  first): MB/s on one thread and on --threads threads (default: all cores), and per thread.
)";

std::string need(const std::vector<std::string>& a, size_t& i) {
  if (i + 1 >= a.size()) throw TokUsage(a[i] + " needs a value");
  return a[++i];
}

int64_t to_int(const std::string& flag, const std::string& v) {
  try {
    size_t n = 0;
    const long long x = std::stoll(v, &n);
    if (n != v.size()) throw 0;
    return x;
  } catch (...) {
    throw TokUsage(flag + " expects an integer (got \"" + v + "\")");
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

int cmd_train(const std::vector<std::string>& a) {
  BpeTrainOptions opt;
  std::string out;
  int64_t vocab = -1;
  int threads = 0;
  bool overwrite = false, special_given = false;
  InputFilter filter;
  std::vector<std::string> inputs;
  for (size_t i = 1; i < a.size(); ++i) {
    if (a[i] == "--vocab") vocab = to_int(a[i], need(a, i));
    else if (a[i] == "--out") out = need(a, i);
    else if (a[i] == "--special") {
      if (!special_given) opt.special.clear();
      special_given = true;
      opt.special.push_back(need(a, i));
    } else if (a[i] == "--pretokenizer") opt.pretokenizer = need(a, i);
    else if (a[i] == "--min-frequency") opt.min_frequency = to_int(a[i], need(a, i));
    else if (a[i] == "--threads") threads = int(to_int(a[i], need(a, i)));
    else if (a[i] == "--include") filter.include.push_back(need(a, i));
    else if (a[i] == "--exclude") filter.exclude.push_back(need(a, i));
    else if (a[i] == "--overwrite") overwrite = true;
    else if (a[i].rfind("--", 0) == 0) throw TokUsage("unknown option " + a[i]);
    else inputs.push_back(a[i]);
  }
  if (vocab < 0) throw TokUsage("train needs --vocab N");
  if (vocab > int64_t(1) << 31) throw TokUsage("--vocab is too large");
  if (out.empty()) throw TokUsage("train needs --out TOKENIZER.json");
  if (inputs.empty()) throw TokUsage("train needs at least one input file or directory");
  if (opt.pretokenizer != "llama3" && opt.pretokenizer != "gpt2")
    throw TokUsage("--pretokenizer must be llama3 or gpt2 (got \"" + opt.pretokenizer + "\")");
  if (opt.min_frequency < 1) throw TokUsage("--min-frequency must be >= 1");
  if (threads < 0) throw TokUsage("--threads must be >= 0");
  opt.vocab_size = uint32_t(vocab);
  std::error_code ec;
  if (std::filesystem::exists(out, ec) && !overwrite)
    fail("tokenizer train: {} already exists; refusing to overwrite it (pass --overwrite)", out);
  if (threads == 0) threads = omp_get_max_threads();

  const auto t0 = std::chrono::steady_clock::now();
  const InputFiles in = collect_input_files(inputs, filter, "tokenizer train");
  PieceCounter counter(opt.pretokenizer, threads);
  std::vector<std::string> batch;
  size_t batch_bytes = 0;
  int64_t binary = 0;
  for (const auto& f : in.files) {
    const bool ok = read_documents(f, [&](std::string&& d) {
      batch_bytes += d.size();
      batch.push_back(std::move(d));
      if (batch_bytes >= (size_t(16) << 20)) {
        counter.add(batch);
        batch.clear();
        batch_bytes = 0;
      }
    });
    if (!ok) ++binary;
  }
  counter.add(batch);
  batch.clear();
  const auto& counts = counter.finish();
  if (counter.documents() == 0)
    fail("tokenizer train: no documents in {} ({} files, {} binary)", inputs[0], in.files.size(), binary);
  const double t_count = seconds_since(t0);
  spdlog::info("tokenizer train: {} documents, {} bytes, {} distinct pieces counted in {:.1f} s", counter.documents(),
               counter.bytes(), counts.size(), t_count);
  const auto t1 = std::chrono::steady_clock::now();
  BpeTokenizer tok = train_bpe(counts, opt, out);
  const double t_merge = seconds_since(t1);
  tok.save(out, overwrite);
  std::printf("wrote %s: vocab %u (%zu merges, %zu special), pre-tokenizer %s, from %llu documents / %llu bytes; "
              "counting %.1f s, merging %.1f s, %d threads\n",
              out.c_str(), tok.vocab_size(), tok.definition().merges.size(), tok.definition().added.size(),
              opt.pretokenizer.c_str(), (unsigned long long)counter.documents(), (unsigned long long)counter.bytes(),
              t_count, t_merge, threads);
  return 0;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail("tokenizer: cannot open {}", path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

int cmd_encode(const std::vector<std::string>& a) {
  std::string tpath, file, text;
  bool special = false, have_text = false;
  for (size_t i = 1; i < a.size(); ++i) {
    if (a[i] == "--tokenizer") tpath = need(a, i);
    else if (a[i] == "--file") file = need(a, i);
    else if (a[i] == "--special") special = true;
    else if (a[i].rfind("--", 0) == 0) throw TokUsage("unknown option " + a[i]);
    else if (!have_text) text = a[i], have_text = true;
    else throw TokUsage("encode takes one TEXT argument (quote it)");
  }
  if (tpath.empty()) throw TokUsage("encode needs --tokenizer T.json");
  if (file.empty() == !have_text) throw TokUsage("encode needs either --file F or TEXT");
  const BpeTokenizer tok = BpeTokenizer::load(tpath);
  if (!file.empty()) text = read_file(file);
  std::vector<uint32_t> ids;
  if (special) tok.encode_with_special(text, ids);
  else tok.encode(text, ids);
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) line += (i ? " " : "") + std::to_string(ids[i]);
  std::printf("%s\n", line.c_str());
  return 0;
}

int cmd_decode(const std::vector<std::string>& a) {
  std::string tpath;
  std::vector<uint32_t> ids;
  for (size_t i = 1; i < a.size(); ++i) {
    if (a[i] == "--tokenizer") tpath = need(a, i);
    else if (a[i].rfind("--", 0) == 0) throw TokUsage("unknown option " + a[i]);
    else {
      const int64_t v = to_int("ID", a[i]);
      if (v < 0 || v > int64_t(UINT32_MAX)) throw TokUsage("ID " + a[i] + " is out of range");
      ids.push_back(uint32_t(v));
    }
  }
  if (tpath.empty()) throw TokUsage("decode needs --tokenizer T.json");
  const std::string s = BpeTokenizer::load(tpath).decode(ids);
  std::fwrite(s.data(), 1, s.size(), stdout);
  return 0;
}

int cmd_info(const std::vector<std::string>& a) {
  if (a.size() != 2) throw TokUsage("info takes one T.json");
  const BpeTokenizer tok = BpeTokenizer::load(a[1]);
  const auto& d = tok.definition();
  std::string pre;
  for (const auto& s : d.pretok) {
    if (!pre.empty()) pre += " + ";
    switch (s.kind) {
      case PreTokStage::kSplitGpt2: pre += "Split(GPT-2 regex)"; break;
      case PreTokStage::kSplitLlama3: pre += s.digit_run == 1 ? "Split(Qwen2 regex)" : "Split(LLaMA-3 regex)"; break;
      case PreTokStage::kDigits: pre += s.individual_digits ? "Digits(individual)" : "Digits(runs)"; break;
      case PreTokStage::kByteLevel:
        pre += fmt::format("ByteLevel(use_regex={}, add_prefix_space={})", s.use_regex, s.add_prefix_space);
        break;
    }
  }
  std::printf("tokenizer %s\n  model          byte-level BPE%s\n  vocab size     %u (%zu merges, %zu added tokens)\n"
              "  pre-tokenizer  %s\n  end token      %u \"%s\"\n  hash           %s\n  shard dtype    %s\n",
              a[1].c_str(), d.ignore_merges ? " (ignore_merges)" : "", tok.vocab_size(), d.merges.size(),
              d.added.size(), pre.c_str(), tok.eot_id(), d.eot.c_str(), tok.hash().c_str(),
              tok.vocab_size() <= 65536 ? "uint16" : "uint32");
  return 0;
}

int cmd_bench(const std::vector<std::string>& a) {
  std::string tpath;
  int threads = 0;
  int64_t mb = 100;
  std::vector<std::string> files;
  InputFilter filter;
  for (size_t i = 1; i < a.size(); ++i) {
    if (a[i] == "--tokenizer") tpath = need(a, i);
    else if (a[i] == "--include") filter.include.push_back(need(a, i));
    else if (a[i] == "--exclude") filter.exclude.push_back(need(a, i));
    else if (a[i] == "--threads") threads = int(to_int(a[i], need(a, i)));
    else if (a[i] == "--mb") mb = to_int(a[i], need(a, i));
    else if (a[i].rfind("--", 0) == 0) throw TokUsage("unknown option " + a[i]);
    else files.push_back(a[i]);
  }
  if (tpath.empty() || files.empty()) throw TokUsage("bench needs --tokenizer T.json and FILES");
  if (threads <= 0) threads = omp_get_max_threads();
  const BpeTokenizer tok = BpeTokenizer::load(tpath);
  const InputFiles in = collect_input_files(files, filter, "tokenizer bench");
  std::vector<std::string> docs;
  size_t bytes = 0;
  const size_t limit = size_t(std::max<int64_t>(mb, 1)) << 20;
  for (const auto& f : in.files) {
    if (bytes >= limit) break;
    read_documents(f, [&](std::string&& d) {
      if (bytes >= limit) return;
      bytes += d.size();
      docs.push_back(std::move(d));
    });
  }
  if (docs.empty()) fail("tokenizer bench: no documents in the inputs");
  auto run = [&](const BpeTokenizer& t, int nt) {
    std::vector<uint64_t> counts(size_t(nt), 0);
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt)
    {
      std::vector<uint32_t> ids;
      uint64_t n = 0;
#pragma omp for schedule(dynamic, 8)
      for (int64_t i = 0; i < int64_t(docs.size()); ++i) {
        ids.clear();
        t.encode(docs[size_t(i)], ids);
        n += ids.size();
      }
      counts[size_t(omp_get_thread_num())] = n;
    }
    const double s = seconds_since(t0);
    uint64_t total = 0;
    for (auto c : counts) total += c;
    std::printf("  %2d thread%s: %7.2f s, %8.2f MB/s (%.2f MB/s per thread), %llu tokens, %.3f bytes/token\n", nt,
                nt == 1 ? " " : "s", s, double(bytes) / 1e6 / s, double(bytes) / 1e6 / s / nt,
                (unsigned long long)total, double(bytes) / double(total));
  };
  std::printf("encoding %.1f MB (%zu documents) with %s (vocab %u); MB = 10^6 bytes; each run starts with an empty "
              "piece cache\n", double(bytes) / 1e6, docs.size(), tpath.c_str(), tok.vocab_size());
  // A fresh tokenizer per run, so that no run profits from the previous one's cache.
  run(tok, 1);
  if (threads > 1) run(BpeTokenizer::load(tpath), threads);
  return 0;
}

}  // namespace

int cmd_tokenizer(const std::vector<std::string>& a) {
  try {
    if (a.empty()) return std::fputs(kTokenizerHelp, stdout), 2;
    for (const auto& s : a)
      if (s == "--help" || s == "-h") return std::fputs(kTokenizerHelp, stdout), 0;
    if (a[0] == "train") return cmd_train(a);
    if (a[0] == "encode") return cmd_encode(a);
    if (a[0] == "decode") return cmd_decode(a);
    if (a[0] == "info") return cmd_info(a);
    if (a[0] == "bench") return cmd_bench(a);
    throw TokUsage("unknown tokenizer command \"" + a[0] + "\" (train, encode, decode, info, bench)");
  } catch (const TokUsage& e) {
    std::fprintf(stderr, "dmatrain tokenizer: %s (see dmatrain tokenizer --help)\n", e.what());
    return 2;
  }
}

}  // namespace dmat::cli
