// Input files to documents (see documents.h).
#include "data/documents.h"

#include <fnmatch.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string_view>

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "core/error.h"

namespace dmat {
namespace fs = std::filesystem;

namespace {

std::string lower(std::string s) {
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

enum class Kind { kText, kJsonl, kOther };

Kind file_kind(const fs::path& p) {
  const std::string ext = lower(p.extension().string());
  if (ext == ".txt" || ext == ".md" || ext == ".rst" || ext == ".text") return Kind::kText;
  if (ext == ".jsonl") return Kind::kJsonl;
  return Kind::kOther;
}

// Reads a file line by line in 1 MiB chunks (inputs may be far larger than memory). A line ends at
// LF, CRLF or a lone CR, which is how CRLF/CR input is normalised to LF.
class LineReader {
 public:
  explicit LineReader(const std::string& path) : path_(path), f_(path, std::ios::binary) {
    if (!f_) fail("cannot open input {}: {}", path, std::strerror(errno));
  }
  // True if the first n bytes hold a NUL (a binary file); reads them, then rewinds.
  bool looks_binary(size_t n) {
    std::string head(n, '\0');
    f_.read(head.data(), std::streamsize(n));
    head.resize(size_t(f_.gcount()));
    f_.clear();
    f_.seekg(0);
    return head.find('\0') != std::string::npos;
  }
  // The next line without its terminator; false at end of file.
  bool next(std::string& line) {
    line.clear();
    for (;;) {
      if (pos_ == buf_.size() && !fill()) return !line.empty();  // an unterminated last line
      const char* b = buf_.data() + pos_;
      const size_t avail = buf_.size() - pos_;
      if (skip_lf_) {  // the CR of a CRLF ended the previous line
        skip_lf_ = false;
        if (*b == '\n') {
          ++pos_;
          continue;
        }
      }
      size_t i = 0;
      while (i < avail && b[i] != '\n' && b[i] != '\r') ++i;
      line.append(b, i);
      pos_ += i;
      if (i == avail) continue;
      skip_lf_ = b[i] == '\r';
      ++pos_;
      return true;
    }
  }
  uint64_t bytes_read() const { return bytes_; }

 private:
  bool fill() {
    buf_.resize(1 << 20);
    f_.read(buf_.data(), std::streamsize(buf_.size()));
    buf_.resize(size_t(f_.gcount()));
    pos_ = 0;
    bytes_ += buf_.size();
    if (f_.bad()) fail("read failed for input {}", path_);
    return !buf_.empty();
  }
  std::string path_;
  std::ifstream f_;
  std::string buf_;
  size_t pos_ = 0;
  uint64_t bytes_ = 0;
  bool skip_lf_ = false;
};

// CRLF and lone CR become LF (for text inside JSON strings).
std::string normalise_newlines(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\r') {
      out.push_back('\n');
      if (i + 1 < s.size() && s[i + 1] == '\n') ++i;
    } else {
      out.push_back(s[i]);
    }
  }
  return out;
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\f\v") == std::string_view::npos;
}

// Splits a text file's lines into documents at runs of two or more blank lines (see prepare.h).
// Each document keeps its lines from the first non-blank to the last non-blank one, each ending
// in '\n'; single blank lines (paragraph breaks) stay inside a document.
template <class Emit>
class TextSplitter {
 public:
  explicit TextSplitter(Emit& emit) : emit_(emit) {}
  void line(std::string_view l) {
    if (is_blank(l)) {
      ++pending_blank_;
      return;
    }
    if (!doc_.empty()) {
      if (pending_blank_ >= 2) {
        emit_(std::move(doc_));
        doc_.clear();
      } else {
        doc_.append(size_t(pending_blank_), '\n');
      }
    }
    pending_blank_ = 0;
    doc_.append(l);
    doc_.push_back('\n');
  }
  void finish() {
    if (!doc_.empty()) emit_(std::move(doc_));
    doc_.clear();
  }

 private:
  Emit& emit_;
  std::string doc_;
  int64_t pending_blank_ = 0;  // blank lines since the last non-blank one
};

bool is_code(const std::string& ext) {
  static const char* const kCode[] = {".py",  ".pyi", ".c",  ".h",  ".cc", ".cpp", ".cxx", ".hpp",  ".hh",    ".cu",
                                      ".cuh", ".rs",  ".go", ".java", ".js", ".ts", ".sh",  ".f90", ".jl", ".lua",
                                      ".rb",  ".pl",  ".cmake", ".proto"};
  return std::any_of(std::begin(kCode), std::end(kCode), [&](const char* e) { return ext == e; });
}

bool glob_match(const std::string& glob, const fs::path& rel) {
  const std::string target = glob.find('/') == std::string::npos ? rel.filename().string() : rel.generic_string();
  return ::fnmatch(glob.c_str(), target.c_str(), FNM_PATHNAME) == 0;
}

bool any_match(const std::vector<std::string>& globs, const fs::path& rel) {
  return std::any_of(globs.begin(), globs.end(), [&](const std::string& g) { return glob_match(g, rel); });
}

}  // namespace

InputFiles collect_input_files(const std::vector<std::string>& inputs, const InputFilter& filter,
                               const std::string& what) {
  InputFiles r;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const std::string& in = inputs[k];
    std::error_code ec;
    if (fs::is_directory(in, ec)) {
      std::vector<std::string> found;
      int64_t skipped_here = 0;
      fs::path example;  // a file the filters skipped
      auto it = fs::recursive_directory_iterator(in, fs::directory_options::skip_permission_denied, ec);
      for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
        const fs::path rel = it->path().lexically_relative(in);  // no symlink resolution
        if (it->is_directory(ec)) {
          if (any_match(filter.exclude, rel)) it.disable_recursion_pending();
          continue;
        }
        if (!it->is_regular_file(ec)) continue;
        const bool selected = filter.include.empty() ? file_kind(it->path()) != Kind::kOther
                                                     : any_match(filter.include, rel);
        if (!selected || any_match(filter.exclude, rel)) {
          ++r.skipped;
          if (skipped_here++ == 0) example = rel;
          continue;
        }
        found.push_back(it->path().string());
      }
      if (ec) fail("{}: cannot list input directory {}: {}", what, in, ec.message());
      if (found.empty() && skipped_here > 0) {
        const std::string ext = example.extension().string();
        if (filter.include.empty())
          spdlog::warn("{}: input {}: all {} files skipped (e.g. {}): inside a directory only .txt .md .rst .text and "
                       ".jsonl files are read unless --include selects others (e.g. --include '*{}')",
                       what, in, skipped_here, example.string(), ext.empty() ? "" : ext);
        else
          spdlog::warn("{}: input {}: none of its {} files matches --include or all are --exclude'd (e.g. {})", what,
                       in, skipped_here, example.string());
      }
      std::sort(found.begin(), found.end());
      for (auto& f : found) {
        r.files.push_back(std::move(f));
        r.input_of.push_back(k);
      }
    } else if (fs::is_regular_file(in, ec)) {
      r.files.push_back(in);
      r.input_of.push_back(k);
    } else {
      fail("{}: input {}: no such file or directory", what, in);
    }
  }
  return r;
}

bool read_documents(const std::string& path, const std::function<void(std::string&&)>& emit,
                    const std::function<void(uint64_t)>& progress, uint64_t* bytes_read) {
  LineReader in(path);
  if (bytes_read) *bytes_read = 0;
  if (in.looks_binary(8192)) {
    spdlog::warn("skipping {}: looks binary (NUL byte in the first 8 KiB)", path);
    return false;
  }
  uint64_t tick = 0;
  auto maybe_progress = [&] {
    if (progress && (++tick & 0x3ff) == 0) progress(in.bytes_read());
  };
  std::string line;
  const std::string ext = lower(fs::path(path).extension().string());
  if (ext == ".jsonl") {
    int64_t line_no = 0;
    while (in.next(line)) {
      ++line_no;
      if (is_blank(line)) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail("{}:{}: invalid JSON ({})", path, line_no, e.what());
      }
      if (!j.is_object() || !j.contains("text") || !j["text"].is_string())
        fail("{}:{}: expected a JSON object with a \"text\" string field", path, line_no);
      std::string doc = normalise_newlines(j["text"].get<std::string>());
      if (!doc.empty()) emit(std::move(doc));
      maybe_progress();
    }
  } else if (is_code(ext)) {
    std::string doc;
    while (in.next(line)) {
      doc += line;
      doc.push_back('\n');
      maybe_progress();
    }
    if (doc.find_first_not_of(" \t\f\v\n") != std::string::npos) emit(std::move(doc));
  } else {
    auto e = [&](std::string&& d) { emit(std::move(d)); };
    TextSplitter<decltype(e)> split(e);
    while (in.next(line)) {
      split.line(line);
      maybe_progress();
    }
    split.finish();
  }
  if (bytes_read) *bytes_read = in.bytes_read();
  return true;
}

}  // namespace dmat
