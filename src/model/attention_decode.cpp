// What every attention variant shares for incremental decoding (attention.h): the refusing
// defaults and the per-step scratch.
#include "model/attention.h"

namespace dmat {

DecodeScratch::DecodeScratch(DType dtype, std::initializer_list<Shape> shapes) {
  TensorTable t;
  int i = 0;
  for (const Shape& s : shapes) t.add("decode.scratch." + std::to_string(i++), s);
  arena_ = Arena(t, dtype, Device::CPU);
}

void DecodeCache::rewind(int64_t new_len) {
  DMAT_CHECK(new_len >= 0 && new_len <= len, "decode cache: rewind to {} positions (it holds {})", new_len, len);
  len = new_len;
}

std::unique_ptr<DecodeCache> Attention::make_decode_cache(const LayerCtx&, int64_t) const {
  fail("incremental decoding (a KV cache) is not implemented for this attention variant (dmatrain generate "
       "supports mha, swa, dma, mla and nsa)");
}

void Attention::decode(const LayerCtx& c, DecodeCache& cache, const Tensor& x, const Tensor& out) const {
  make_decode_cache(c, 0);  // refuses with the same message
}

}  // namespace dmat
