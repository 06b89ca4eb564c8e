// Reading inputs as documents: which files an input list names, and how a file becomes documents.
// Shared by `data prepare` and `tokenizer train`, so both see the same text.
//
// Files: a named file is read whatever its extension; a directory is walked recursively (files in
// sorted path order). Inside a directory, without --include, files with a text extension (.txt .md
// .rst .text) and .jsonl are read; with --include GLOB..., exactly the files matching some include
// glob are. --exclude GLOB drops matching files (and never descends into matching directories).
// A glob without '/' matches a file's name; with '/', its path relative to the input directory
// (fnmatch, '*' does not cross '/').
// Documents: CRLF and lone CR become LF. .jsonl: one JSON object per line with a "text" string, one
// document each (blank lines ignored; anything else is an error naming file:line). Source code
// (.py .pyi .c .h .cc .cpp .cxx .hpp .hh .cu .cuh .rs .go .java .js .ts .sh .f90 .jl .lua .rb .pl
// .cmake .proto): the whole file is one document. Any other file: split into documents at runs of two
// or more blank lines (whitespace-only lines count as blank); a document is its lines from the first
// non-blank to the last non-blank one, each ending in LF. A file with a NUL byte in its first 8 KiB
// is binary: skipped with a warning.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace dmat {

struct InputFilter {
  std::vector<std::string> include, exclude;  // globs
};

struct InputFiles {
  std::vector<std::string> files;  // to read, in order
  std::vector<size_t> input_of;    // index into the inputs for each file
  int64_t skipped = 0;             // inside directories, not selected by the filters
};

// Errors if an input does not exist. `what` prefixes error messages ("prepare", "tokenizer train").
InputFiles collect_input_files(const std::vector<std::string>& inputs, const InputFilter& filter,
                               const std::string& what);

// Calls emit(document) for each document of path, in order; progress(bytes read so far) now and
// then. Returns false (and emits nothing) if the file is binary.
bool read_documents(const std::string& path, const std::function<void(std::string&&)>& emit,
                    const std::function<void(uint64_t)>& progress = {}, uint64_t* bytes_read = nullptr);

}  // namespace dmat
