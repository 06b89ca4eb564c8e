// `data prepare` (text -> documents -> tokens -> shards + manifest) and `data inspect`.
#include "data/prepare.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <exception>
#include <sstream>
#include <unordered_set>

#include <nlohmann/json.hpp>
#include <omp.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include "core/error.h"
#include "core/rng.h"
#include "data/documents.h"
#include "data/shard.h"
#include "tokenizer/tokenizer.h"

namespace dmat {
namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

uint64_t fnv1a64(std::string_view s) { return dmat::fnv1a64(s.data(), s.size()); }

// A second, independent 64-bit hash (splitmix over 8-byte words); with FNV-1a it keys the
// duplicate filter by 128 bits, so "exact duplicate" is exact up to a ~2^-64 collision chance.
uint64_t word_hash64(std::string_view s) {
  uint64_t h = hash64(0x64757065ull, s.size());
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = hash64(h, w);
  }
  uint64_t tail = 0;
  for (size_t k = 0; i + k < s.size(); ++k) tail |= uint64_t(static_cast<unsigned char>(s[i + k])) << (8 * k);
  return hash64(h, tail);
}

struct Key128 {
  uint64_t a, b;
  bool operator==(const Key128&) const = default;
};
struct Key128Hash {
  size_t operator()(const Key128& k) const { return size_t(k.a ^ (k.b * 0x9E3779B97F4A7C15ull)); }
};

std::string hex64(uint64_t v) { return fmt::format("{:016x}", v); }

// Accumulates one split's tokens and writes a shard every shard_tokens tokens.
struct SplitWriter {
  std::string name, dir;  // "train", staging folder
  int64_t shard_tokens = 0;
  uint32_t vocab = 0;
  std::vector<uint32_t> buf;
  std::vector<std::string> files;  // shard file names, in order
  int64_t documents = 0, bytes = 0, tokens = 0;

  void add(const std::vector<uint32_t>& toks) {
    size_t i = 0;
    while (i < toks.size()) {
      const size_t take = std::min(toks.size() - i, size_t(shard_tokens) - buf.size());
      buf.insert(buf.end(), toks.begin() + int64_t(i), toks.begin() + int64_t(i + take));
      i += take;
      if (int64_t(buf.size()) == shard_tokens) flush();
    }
    tokens += int64_t(toks.size());
  }
  void flush() {
    if (buf.empty()) return;
    const std::string file = fmt::format("shard_{:06d}.bin", files.size());
    write_shard(dir + "/" + file, buf, vocab);
    files.push_back(file);
    buf.clear();
  }
};

std::vector<std::string> existing_shards(const fs::path& out) {
  std::vector<std::string> found;
  std::error_code ec;
  for (const char* split : {"train", "val"}) {
    const fs::path d = out / split;
    if (!fs::is_directory(d, ec)) continue;
    for (const auto& e : fs::directory_iterator(d, ec))
      if (e.path().extension() == ".bin") found.push_back(e.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
  return s;
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (b >= 1000 && u < 4) b /= 1000, ++u;
  return u == 0 ? fmt::format("{:.0f} B", b) : fmt::format("{:.1f} {}", b, units[u]);
}

}  // namespace

PrepareResult prepare_data(const PrepareOptions& opt) {
  if (opt.out_dir.empty()) fail("prepare: no output directory given");
  if (opt.inputs.empty()) fail("prepare: no inputs given (expected text/.jsonl files or directories)");
  if (!(opt.val_fraction >= 0 && opt.val_fraction < 1))
    fail("prepare: val_fraction must be in [0, 1) (got {})", opt.val_fraction);
  if (opt.shard_tokens < 1) fail("prepare: shard_tokens must be >= 1 (got {})", opt.shard_tokens);
  const auto tok = load_tokenizer(opt.tokenizer);

  const fs::path out(opt.out_dir);
  const auto old = existing_shards(out);
  if (!old.empty() && !opt.overwrite)
    fail("prepare: {} already holds {} shard files (e.g. {}); refusing to overwrite them without --overwrite",
         opt.out_dir, old.size(), old[0]);

  const InputFiles in = collect_input_files(opt.inputs, InputFilter{opt.include, opt.exclude}, "prepare");
  const int64_t skipped = in.skipped;
  uint64_t total_input = 0;
  for (const auto& f : in.files) {
    std::error_code size_ec;
    const auto n = fs::file_size(f, size_ec);
    if (!size_ec) total_input += uint64_t(n);
  }

  // Shards are written to a staging folder and moved into place only when everything succeeded.
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) fail("prepare: cannot create output directory {}: {}", opt.out_dir, ec.message());
  const fs::path staging = out / fmt::format(".prepare-staging-{}", ::getpid());
  fs::remove_all(staging, ec);
  SplitWriter train{"train", (staging / "train").string(), opt.shard_tokens, tok->vocab_size(), {}, {}, 0, 0, 0};
  SplitWriter val{"val", (staging / "val").string(), opt.shard_tokens, tok->vocab_size(), {}, {}, 0, 0, 0};

  PrepareResult res;
  ojson manifest;
  try {
    fs::create_directories(train.dir);
    fs::create_directories(val.dir);
    // val iff split hash < val_fraction·2^64 (the product is < 2^64 since val_fraction < 1).
    const uint64_t threshold = uint64_t(opt.val_fraction * 18446744073709551616.0);
    std::unordered_set<Key128, Key128Hash> seen;
    int64_t read_files = 0, binary_files = 0;
    uint64_t input_bytes = 0;
    const auto t0 = std::chrono::steady_clock::now();
    auto last_log = t0;
    struct SourceStats {
      int64_t files = 0, documents = 0, bytes = 0;
    };
    std::vector<SourceStats> sources(opt.inputs.size());

    // Documents are decided (duplicate? which split?) in input order, encoded in parallel in batches
    // of ~kBatchBytes, and appended to their split in input order: output independent of threads.
    struct Pending {
      std::string doc;
      SplitWriter* w;
    };
    constexpr size_t kBatchBytes = size_t(32) << 20;
    std::vector<Pending> batch;
    std::vector<std::vector<uint32_t>> batch_tokens;
    size_t batch_bytes = 0;
    const int threads = opt.threads > 0 ? opt.threads : omp_get_max_threads();
    auto flush_batch = [&] {
      const int64_t n = int64_t(batch.size());
      batch_tokens.resize(batch.size());
      std::exception_ptr error;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t i = 0; i < n; ++i) {
        try {
          auto& t = batch_tokens[size_t(i)];
          t.clear();
          tok->encode(batch[size_t(i)].doc, t);
          t.push_back(tok->eot_id());
        } catch (...) {
#pragma omp critical(prepare_encode_error)
          if (!error) error = std::current_exception();
        }
      }
      if (error) std::rethrow_exception(error);
      for (size_t i = 0; i < batch.size(); ++i) batch[i].w->add(batch_tokens[i]);
      batch.clear();
      batch_bytes = 0;
    };
    size_t current_input = 0;
    auto add_document = [&](std::string&& doc) {
      if (doc.empty()) return;
      const uint64_t h = fnv1a64(doc);
      if (!seen.insert(Key128{h, word_hash64(doc)}).second) {
        ++res.duplicates;
        return;
      }
      SplitWriter& w = splitmix64(h) < threshold ? val : train;
      w.documents += 1;
      w.bytes += int64_t(doc.size());
      sources[current_input].documents += 1;
      sources[current_input].bytes += int64_t(doc.size());
      batch_bytes += doc.size();
      batch.push_back(Pending{std::move(doc), &w});
      if (batch_bytes >= kBatchBytes) flush_batch();
    };
    // Progress on big inputs, every 5 s: bytes read, rate and time left.
    auto maybe_log = [&](uint64_t file_bytes) {
      const auto now = std::chrono::steady_clock::now();
      if (now - last_log < std::chrono::seconds(5)) return;
      last_log = now;
      const double done = double(input_bytes + file_bytes);
      const double secs = std::chrono::duration<double>(now - t0).count();
      const double rate = done / std::max(secs, 1e-9);
      const double left = total_input > done ? (double(total_input) - done) / std::max(rate, 1.0) : 0.0;
      spdlog::info("prepare: {} of {} read ({}/s, about {:.0f} s left), {} documents, {} duplicates", human_bytes(done),
                   human_bytes(double(total_input)), human_bytes(rate), left, train.documents + val.documents,
                   res.duplicates);
    };

    for (size_t fi = 0; fi < in.files.size(); ++fi) {
      const std::string& path = in.files[fi];
      current_input = in.input_of[fi];
      uint64_t file_bytes = 0;
      if (!read_documents(path, add_document, maybe_log, &file_bytes)) {
        ++binary_files;
        continue;
      }
      ++read_files;
      sources[current_input].files += 1;
      input_bytes += file_bytes;
    }
    flush_batch();
    train.flush();
    val.flush();
    res.documents = train.documents + val.documents;
    res.train_tokens = train.tokens;
    res.val_tokens = val.tokens;
    if (res.documents == 0)
      fail("prepare: no documents found in {} ({} files read, {} skipped as binary, {} skipped by type; text "
           "files: .txt .md .rst .text, or .jsonl with a \"text\" field{})",
           join(opt.inputs), read_files, binary_files, skipped,
           skipped > 0 && opt.include.empty() ? "; --include GLOB reads other files inside directories" : "");
    if (opt.val_fraction == 0)
      spdlog::warn("prepare: --val-fraction 0: no validation shards are written ({} has no val/ shards); training "
                   "needs a validation set (data.val): prepare one, or use a val fraction > 0",
                   opt.out_dir);
    else if (val.documents == 0)
      spdlog::warn("prepare: the validation split is empty ({} documents, val_fraction {}): raise --val-fraction",
                   res.documents, opt.val_fraction);
    if (train.documents == 0) spdlog::warn("prepare: the training split is empty: lower --val-fraction");

    // ---- manifest (no timestamps or absolute paths of our own: same inputs, same bytes)
    manifest["format"] = "dmatrain-data";
    manifest["version"] = 1;
    manifest["tokenizer"] = {{"name", tok->name()},
                             {"hash", tok->hash()},
                             {"vocab_size", tok->vocab_size()},
                             {"eot_id", tok->eot_id()},
                             {"path", opt.tokenizer}};
    manifest["inputs"] = opt.inputs;
    manifest["include"] = opt.include;
    manifest["exclude"] = opt.exclude;
    ojson srcs = ojson::array();
    for (size_t k = 0; k < opt.inputs.size(); ++k)
      srcs.push_back({{"input", opt.inputs[k]},
                      {"files", sources[k].files},
                      {"documents", sources[k].documents},
                      {"bytes", sources[k].bytes}});
    manifest["sources"] = srcs;
    manifest["files_read"] = read_files;
    manifest["files_skipped_binary"] = binary_files;
    manifest["files_skipped_type"] = skipped;
    manifest["input_bytes"] = input_bytes;
    manifest["documents"] = res.documents;
    manifest["duplicates"] = res.duplicates;
    manifest["bytes"] = train.bytes + val.bytes;
    manifest["val_fraction"] = opt.val_fraction;
    manifest["split_rule"] = "val iff splitmix64(fnv1a64(document bytes)) < val_fraction * 2^64";
    manifest["shard_tokens"] = opt.shard_tokens;
    for (SplitWriter* w : {&train, &val}) {
      ojson shards = ojson::array();
      for (const auto& f : w->files) {
        const std::string p = w->dir + "/" + f;
        const ShardInfo info = read_shard_info(p);
        shards.push_back({{"file", w->name + "/" + f},
                          {"tokens", info.n_tokens},
                          {"token_bytes", info.token_bytes},
                          {"fnv1a64", hex64(file_checksum(p))}});
      }
      manifest[w->name] = {{"documents", w->documents},
                           {"bytes", w->bytes},
                           {"tokens", w->tokens},
                           {"shards", shards}};
    }

    // ---- commit: remove the old shards (overwrite), move the new ones in, manifest last
    for (const auto& p : old) fs::remove(p);
    fs::remove(out / "manifest.json", ec);
    for (SplitWriter* w : {&train, &val}) {
      fs::create_directories(out / w->name);
      for (const auto& f : w->files) fs::rename(fs::path(w->dir) / f, out / w->name / f);
    }
    fs::remove_all(staging, ec);
    const std::string mpath = (out / "manifest.json").string();
    const std::string mtmp = mpath + ".tmp";
    {
      std::ofstream m(mtmp, std::ios::binary | std::ios::trunc);
      m << manifest.dump(2) << "\n";
      if (!m) fail("prepare: cannot write {}", mtmp);
    }
    fs::rename(mtmp, mpath);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    spdlog::info("prepare: {} -> {}: {} documents ({} duplicates dropped), train {} tokens in {} shards, val {} "
                 "tokens in {} shards ({:.1f} s)",
                 join(opt.inputs), opt.out_dir, res.documents, res.duplicates, train.tokens, train.files.size(),
                 val.tokens, val.files.size(), s);
  } catch (const fs::filesystem_error& e) {
    fs::remove_all(staging, ec);
    fail("prepare: {}", e.what());
  } catch (...) {
    fs::remove_all(staging, ec);
    throw;
  }
  return res;
}

// ---- inspect ---------------------------------------------------------------------------------

namespace {

// Renders decoded byte-tokenizer text for a terminal: eot visible, control bytes escaped.
std::string render_sample(const std::vector<uint32_t>& ids, uint32_t eot) {
  std::string s;
  for (uint32_t id : ids) {
    if (id == eot) {
      s += "<|eot|>";
    } else if (id == '\n' || id == '\t' || (id >= 0x20 && id != 0x7f)) {
      s.push_back(char(static_cast<unsigned char>(id)));
    } else {
      s += fmt::format("\\x{:02x}", id);
    }
  }
  return s;
}

std::string inspect_shard(const std::string& path, int64_t sample_tokens) {
  ShardReader r(path);
  const ShardInfo& info = r.info();
  std::string o;
  o += fmt::format("shard {}\n", path);
  o += fmt::format("  format version  {}\n", info.version);
  o += fmt::format("  token width     {} bytes (uint{})\n", info.token_bytes, info.token_bytes * 8);
  o += fmt::format("  vocab size      {}\n", info.vocab_size);
  o += fmt::format("  tokens          {}\n", info.n_tokens);
  if (info.sequence_length > 0)
    o += fmt::format("  sequences       {} of {} tokens (+ 1 trailing token): read only at seq_len {}\n",
                     info.n_tokens > 0 ? (info.n_tokens - 1) / info.sequence_length : 0, info.sequence_length,
                     info.sequence_length);
  if (info.has_mask && info.n_tokens > 0) {
    uint64_t on = 0;
    std::vector<uint8_t> m(1 << 16);
    for (uint64_t i0 = 0; i0 < info.n_tokens; i0 += m.size()) {
      const uint64_t n = std::min<uint64_t>(m.size(), info.n_tokens - i0);
      r.read_mask(i0, n, m.data());
      for (uint64_t i = 0; i < n; ++i) on += m[i];
    }
    o += fmt::format("  loss mask       {} of {} tokens are targets in the loss\n", on, info.n_tokens);
  }
  if (info.n_tokens == 0) return o;
  // Full scan (also validates every token against the vocab).
  uint32_t lo = std::numeric_limits<uint32_t>::max(), hi = 0;
  uint64_t eots = 0;
  const bool byte_tok = info.vocab_size == 257;
  std::vector<int32_t> buf(1 << 16);
  for (uint64_t i0 = 0; i0 < info.n_tokens; i0 += buf.size()) {
    const uint64_t n = std::min<uint64_t>(buf.size(), info.n_tokens - i0);
    r.read(i0, n, buf.data());
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t t = uint32_t(buf[i]);
      lo = std::min(lo, t);
      hi = std::max(hi, t);
      if (byte_tok && t == 256) ++eots;
    }
  }
  o += fmt::format("  min / max token {} / {}\n", lo, hi);
  if (byte_tok) o += fmt::format("  documents       {} (end-of-document tokens, byte tokenizer assumed)\n", eots);
  const uint64_t n = std::min<uint64_t>(uint64_t(std::max<int64_t>(sample_tokens, 0)), info.n_tokens);
  if (n == 0) return o;
  std::vector<int32_t> head(n);
  r.read(0, n, head.data());
  std::vector<uint32_t> ids(head.begin(), head.end());
  if (byte_tok) {
    o += fmt::format("  first {} tokens, decoded as bytes:\n", n);
    o += "----\n" + render_sample(ids, 256) + "\n----\n";
  } else {
    o += fmt::format("  first {} token ids:\n   ", n);
    for (uint32_t id : ids) o += fmt::format(" {}", id);
    o += "\n";
  }
  return o;
}

std::string inspect_dir(const fs::path& dir) {
  const fs::path mpath = dir / "manifest.json";
  std::string o;
  if (!fs::exists(mpath)) {
    // A bare folder of shards: one header line per shard.
    const auto shards = list_shards(dir.string());
    uint64_t total = 0;
    o += fmt::format("shard set {} ({} shards, no manifest.json)\n", dir.string(), shards.size());
    for (const auto& p : shards) {
      const ShardInfo i = read_shard_info(p);
      total += i.n_tokens;
      o += fmt::format("  {}  {} tokens, vocab {}, uint{}\n", p, i.n_tokens, i.vocab_size, i.token_bytes * 8);
    }
    o += fmt::format("  total {} tokens\n", total);
    return o;
  }
  ojson m;
  try {
    std::ifstream f(mpath);
    m = ojson::parse(f);
  } catch (const nlohmann::json::exception& e) {
    fail("inspect: {}: invalid JSON ({})", mpath.string(), e.what());
  }
  if (m.contains("generator")) {  // generated data (data mqar): its options and shards
    try {
      o += fmt::format("generated data {} ({})\n", dir.string(), m.at("generator").get<std::string>());
      for (const auto& [k, v] : m.at("options").items()) o += fmt::format("  {:<15} {}\n", k, v.dump());
      for (const char* split : {"train", "test"}) {
        const auto& sp = m.at(split);
        o += fmt::format("  {:<5}           {} examples, {} tokens, {} answers in {} shards\n", split,
                         sp.at("examples").get<int64_t>(), sp.at("tokens").get<int64_t>(),
                         sp.at("answers").get<int64_t>(), sp.at("shards").size());
        for (const auto& sh : sp.at("shards")) {
          const std::string file = sh.at("file").get<std::string>();
          std::string status;
          try {
            const ShardInfo i = read_shard_info((dir / file).string());
            status = i.n_tokens == sh.at("tokens").get<uint64_t>() ? "ok" : "MISMATCH";
          } catch (const Error& e) {
            status = fmt::format("BAD: {}", e.what());
          }
          o += fmt::format("    {}  {} tokens  [{}]\n", file, sh.at("tokens").get<int64_t>(), status);
        }
      }
      o += fmt::format("  disjoint        {} ({} train examples redrawn)\n", m.at("disjoint").get<std::string>(),
                       m.at("train_redrawn").get<int64_t>());
    } catch (const nlohmann::json::exception& e) {
      fail("inspect: {}: not a dmatrain data manifest ({})", mpath.string(), e.what());
    }
    return o;
  }
  try {
    o += fmt::format("prepared data {}\n", dir.string());
    o += fmt::format("  tokenizer       {} ({}, vocab {})\n", m.at("tokenizer").at("name").get<std::string>(),
                     m.at("tokenizer").at("hash").get<std::string>(), m.at("tokenizer").at("vocab_size").get<int64_t>());
    std::vector<std::string> inputs = m.at("inputs").get<std::vector<std::string>>();
    o += fmt::format("  inputs          {}\n", join(inputs));
    o += fmt::format("  documents       {} ({} duplicates dropped)\n", m.at("documents").get<int64_t>(),
                     m.at("duplicates").get<int64_t>());
    o += fmt::format("  text bytes      {}\n", m.at("bytes").get<int64_t>());
    o += fmt::format("  val fraction    {}\n", m.at("val_fraction").get<double>());
    for (const char* split : {"train", "val"}) {
      const auto& s = m.at(split);
      const auto& shards = s.at("shards");
      o += fmt::format("  {:<5}           {} documents, {} bytes, {} tokens in {} shards\n", split,
                       s.at("documents").get<int64_t>(), s.at("bytes").get<int64_t>(), s.at("tokens").get<int64_t>(),
                       shards.size());
      for (const auto& sh : shards) {
        const std::string file = sh.at("file").get<std::string>();
        const uint64_t n = sh.at("tokens").get<uint64_t>();
        std::string status;
        try {
          const ShardInfo i = read_shard_info((dir / file).string());
          status = i.n_tokens == n ? "ok" : fmt::format("MISMATCH: file holds {} tokens", i.n_tokens);
        } catch (const Error& e) {
          status = fmt::format("BAD: {}", e.what());
        }
        o += fmt::format("    {}  {} tokens  fnv1a64 {}  [{}]\n", file, n, sh.at("fnv1a64").get<std::string>(), status);
      }
    }
  } catch (const nlohmann::json::exception& e) {
    fail("inspect: {}: not a dmatrain data manifest ({})", mpath.string(), e.what());
  }
  // A decoded sample of the first train shard, when the tokenizer named in the manifest is at hand
  // (its path as given to prepare, relative to the current directory) and is the same one (hash).
  const auto& t = m["tokenizer"];
  const std::string tpath = t.value("path", std::string());
  const auto& shards = m["train"]["shards"];
  if (!tpath.empty() && !shards.empty() && (tpath == "byte" || fs::is_regular_file(tpath))) {
    try {
      const auto tok = load_tokenizer(tpath);
      if (tok->hash() != t.value("hash", std::string())) {
        o += fmt::format("  (no sample: tokenizer {} has changed since, hash {})\n", tpath, tok->hash());
      } else {
        ShardReader r((dir / shards[0].at("file").get<std::string>()).string());
        const uint64_t n = std::min<uint64_t>(r.info().n_tokens, 120);
        std::vector<int32_t> head(n);
        r.read(0, n, head.data());
        std::string text;
        for (int32_t id : head) {
          text += uint32_t(id) == tok->eot_id() ? std::string("<|eot|>") : tok->decode({uint32_t(id)});
        }
        o += fmt::format("  first {} train tokens, decoded with {}:\n----\n{}\n----\n", n, tpath, text);
      }
    } catch (const Error& e) {
      o += fmt::format("  (no sample: {})\n", e.what());
    }
  }
  return o;
}

}  // namespace

std::string inspect_data(const std::string& path, int64_t sample_tokens) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return inspect_dir(path);
  if (fs::is_regular_file(path, ec)) {
    if (fs::path(path).filename() == "manifest.json") return inspect_dir(fs::path(path).parent_path());
    return inspect_shard(path, sample_tokens);
  }
  fail("inspect: {}: no such file or directory (expected a shard .bin file or a prepared data directory)", path);
}

}  // namespace dmat
