// Fuzz target: the token-shard reader (src/data/shard.h) and the data loader over it.
// Input: the bytes of one shard file. An accepted shard reads back whole; the loader's windows over
// it (seq_len 1 … 5, chosen by the input's size) are the shard's tokens, and the shuffled order
// visits every window once per epoch.
#include <set>

#include "data/loader.h"
#include "data/shard.h"
#include "fuzz_util.h"

using namespace dmat;

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fuzz::quiet_logging();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = fuzz::scratch_dir() + "/shards";
  const std::string path = dir + "/0.bin";
  fuzz::write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
  return fuzz::rejecting([&] {
    fuzz::fuzz_require(file_checksum(path) == fnv1a64(data, size), "file_checksum differs from fnv1a64 of the bytes");
    const ShardInfo info = read_shard_info(path);
    ShardReader r(path);
    fuzz::fuzz_require(r.info().n_tokens == info.n_tokens, "ShardReader and read_shard_info disagree");
    std::vector<int32_t> tokens(info.n_tokens);
    r.read(0, info.n_tokens, tokens.data());
    for (int32_t t : tokens) fuzz::fuzz_require(t >= 0 && uint32_t(t) < info.vocab_size, "token >= vocab size");

    const int64_t T = 1 + int64_t(size % 5);
    for (bool shuffle : {false, true}) {
      TokenLoader loader(list_shards(dir), T, /*seed=*/size, shuffle);
      const int64_t W = loader.num_windows();
      fuzz::fuzz_require(W == (int64_t(info.n_tokens) - 1) / T, "window count");
      std::vector<char> hit(size_t(W), 0);
      for (int64_t i = 0; i < W; ++i) {
        const int64_t p = permute_index(i, W, size);
        fuzz::fuzz_require(p >= 0 && p < W && !hit[size_t(p)], "permute_index is not a bijection");
        hit[size_t(p)] = 1;
      }
      std::vector<int32_t> in(size_t(T) * 2 * size_t(W)), tg(in.size());
      loader.get_batch(0, 2 * W, in.data(), tg.data());  // two epochs
      std::set<std::vector<int32_t>> windows, seen;
      for (int64_t w = 0; w < W; ++w) {
        std::vector<int32_t> win(tokens.begin() + w * T, tokens.begin() + w * T + T + 1);
        windows.insert(win);
      }
      for (int64_t g = 0; g < 2 * W; ++g) {
        const int32_t* x = in.data() + g * T;
        const int32_t* y = tg.data() + g * T;
        std::vector<int32_t> win(x, x + T);
        win.push_back(y[T - 1]);
        fuzz::fuzz_require(std::equal(x + 1, x + T, y), "targets are not the inputs shifted by one");
        fuzz::fuzz_require(windows.count(win) == 1, "a sequence that is no window of the shard");
        if (!shuffle) fuzz::fuzz_require(std::equal(win.begin(), win.end(), tokens.begin() + (g % W) * T),
                                         "the sequential order is not the shard's order");
      }
    }
  });
}
