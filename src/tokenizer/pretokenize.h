// Pre-tokenization: cutting text into the pieces BPE merges never cross, exactly as the regexes of
// GPT-2 and LLaMA-3 do (hand-written matchers, no regex engine), plus HF's Digits splitter.
//
//   GPT-2   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//   LLaMA-3 (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
//           \s*[\r\n]+|\s+(?!\S)|\s+           (Qwen2 uses the same with \p{N} instead of \p{N}{1,3})
//
// Semantics are those of a backtracking regex engine's find-all (leftmost alternative that matches
// wins, greedy quantifiers), which the pieces reproduce. \p{L} / \p{N}: Unicode general categories
// L* / N* (tables in unicode_tables.inc); \s: the Unicode White_Space property. Text is UTF-8; a byte
// that does not start a valid UTF-8 sequence counts as one character of no category (neither letter,
// number nor space), so every byte string splits, and the pieces always concatenate to the input.
#pragma once
#include <cstdint>
#include <string_view>
#include <vector>

namespace dmat::tok {

enum class CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

struct Utf8Char {
  uint32_t cp;     // code point; 0xFFFFFFFF for an invalid byte
  uint32_t len;    // bytes, 1-4
  CharClass cls;
};

// Decodes the character at p (n > 0 bytes available). Rejects overlong forms, surrogates and
// code points above U+10FFFF (each such lead byte is one invalid character).
Utf8Char decode_utf8(const unsigned char* p, size_t n);
CharClass char_class(uint32_t cp);
const char* unicode_version();

enum class SplitPattern : uint8_t { kGpt2, kLlama3 };

// Appends the pieces of text (views into it) to out. For kLlama3, digit_run is the longest run of
// numbers one piece holds (3 for LLaMA-3, 1 for Qwen2).
void split_regex(SplitPattern pattern, std::string_view text, std::vector<std::string_view>& out,
                 int digit_run = 3);

// HF's Digits pre-tokenizer: ASCII digits isolated, one per piece (individual) or as runs.
void split_digits(std::string_view text, bool individual, std::vector<std::string_view>& out);

}  // namespace dmat::tok
