// Unicode NFC (canonical decomposition, canonical ordering, canonical composition), the normalizer of
// GPT-NeoX-style tokenizer.json files. Tables: unicode_nfc.inc (gen_unicode_tables.py --nfc).
#pragma once
#include <string>
#include <string_view>

namespace dmat::tok {

// out = NFC(in). Bytes that are not valid UTF-8 pass through unchanged (they never compose). ASCII
// runs are copied as they are (no ASCII character decomposes or composes with what precedes it).
void nfc(std::string_view in, std::string& out);

}  // namespace dmat::tok
