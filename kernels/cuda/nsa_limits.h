// What the Native Sparse Attention CUDA kernels (kernels/cuda/nsa.h) are built for, beside the head
// dims (kernels/cuda/head_dims.h, the rows marked nsa). Host code without CUDA, like head_dims.h, so
// a CPU-only build refuses a configuration the GPU would refuse in the same words; the model layer
// (attention_nsa.cpp, cuda_unsupported) and the ops' argument checks both ask here.
#pragma once
#include <cstdint>
#include <string>

#include <fmt/format.h>

#include "kernels/attention_types.h"
#include "kernels/cuda/head_dims.h"

namespace dmat::cuda {

// Query heads per KV head: the attention kernels' tiles hold 64 (query, head) rows of one GQA group
// (64 / group queries each), and the selection's tiles as many.
inline constexpr int64_t kNsaMaxGroup = 64;
// sel_count: every tile keeps its queries' selection lists in shared memory (64 queries × n ints,
// twice over in the dK/dV pass).
inline constexpr int64_t kNsaMaxSelCount = 64;
// cmp_block / cmp_stride: one 32-key tile of compressed keys credits at most 32 + l/d − 1 selection
// blocks, whose importances the selection kernel accumulates in shared memory.
inline constexpr int64_t kNsaMaxCmpStrides = 64;

// "" when the NSA CUDA kernels run shape s (its B and T are not consulted), else why, naming the
// config keys to change.
inline std::string nsa_cuda_unsupported(const NsaShape& s) {
  if (!head_dims_supported(AttnKernel::nsa, s.D, s.D)) {
    std::string sizes;  // one head_dim for q, k and v: the square rows
    for (const HeadDims& h : kHeadDims)
      if (h.nsa && h.dqk == h.dv) sizes += (sizes.empty() ? "" : ", ") + std::to_string(h.dqk);
    return fmt::format("model.head_dim {} has no CUDA attention kernel for attention type nsa (supported: {})", s.D,
                       sizes);
  }
  if (s.Hkv <= 0 || s.H % s.Hkv != 0 || s.H / s.Hkv > kNsaMaxGroup)
    return fmt::format("model.n_heads / model.n_kv_heads = {} / {}: the NSA CUDA kernels take at most {} query heads "
                       "per KV head",
                       s.H, s.Hkv, kNsaMaxGroup);
  if (s.sel_count > kNsaMaxSelCount)
    return fmt::format("model.attention.sel_count {} exceeds the NSA CUDA kernels' {}", s.sel_count,
                       kNsaMaxSelCount);
  if (s.cmp_stride <= 0 || s.cmp_block / s.cmp_stride > kNsaMaxCmpStrides)
    return fmt::format("model.attention.cmp_block / cmp_stride = {} / {}: the NSA CUDA selection takes blocks of at "
                       "most {} strides",
                       s.cmp_block, s.cmp_stride, kNsaMaxCmpStrides);
  return "";
}

}  // namespace dmat::cuda
