// Fuzz target: the JSONL document reader (read_documents, src/data/documents.cpp), and the same
// bytes read as a text file and as a source file. Input: the file's bytes. Properties: no document
// is empty or holds a CR; a text file's documents start with a non-blank line, end in LF and never
// hold two blank lines in a row (there they split); a source file is one document.
#include "data/documents.h"
#include "fuzz_util.h"

using namespace dmat;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  const std::string dir = fuzz::scratch_dir();
  for (const char* ext : {".jsonl", ".txt", ".py"}) {
    const std::string path = dir + "/docs" + ext;
    fuzz::write_bytes(path, bytes);
    const std::string kind = ext;
    fuzz::rejecting([&] {
      int64_t n = 0;
      uint64_t read = 0;
      const bool text = read_documents(
          path,
          [&](std::string&& d) {
            ++n;
            fuzz::fuzz_require(!d.empty(), "an empty document");
            fuzz::fuzz_require(d.find('\r') == std::string::npos, "a document holds a CR");
            if (kind == ".txt") {
              fuzz::fuzz_require(d.back() == '\n', "a text document does not end in LF");
              fuzz::fuzz_require(d.find("\n\n\n") == std::string::npos, "two blank lines inside a text document");
              fuzz::fuzz_require(d.find_first_not_of(" \t\f\v") != std::string::npos && d[d.find_first_not_of(" \t\f\v")] != '\n',
                                 "a text document starts with a blank line");
            }
          },
          {}, &read);
      fuzz::fuzz_require(!text || read == bytes.size(), "bytes_read is not the file's size");
      if (kind == ".py") fuzz::fuzz_require(n <= 1, "a source file gave several documents");
    });
  }
  return 0;
}
