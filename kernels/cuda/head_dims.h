// The (d_qk, d_v) head-dim pairs our CUDA attention kernels are built for: the one table that the
// attention variants (model), the ops layer, the trainer's pre-check, the benchmarks and the
// kernels' own dispatch consult. Host code without CUDA, so a CPU-only build names a
// configuration the GPU would refuse in the same words. Adding a pair: one row here, and the
// kernels it instantiates must compile and pass test_gpu_attention (and test_gpu_dma for `dma`).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

namespace dmat::cuda {

// The kernel family an attention core runs on: the flash kernels (causal, GQA, sliding window),
// the Dynamic Mask Attention kernels built on them (gathered keys, key groups, bias gradient), or
// Native Sparse Attention's (its compressed and selected branches on kernels/cuda/nsa_*, its window
// branch on the flash kernels).
enum class AttnKernel { flash, dma, nsa };

struct HeadDims {
  int dqk, dv;  // q·k over dqk dims, values of dv dims
  bool wgmma;   // a Hopper (sm_90a) wgmma kernel exists; the mma.sync kernels cover every row
  bool dma;     // the DMA kernels are built for it
  bool nsa;     // the NSA kernels are built for it (kernels/cuda/nsa_attention_sm80.cu; d_qk = d_v)
};

inline constexpr HeadDims kHeadDims[] = {
    {32, 32, false, true, true},
    {64, 64, true, true, true},
    {128, 128, true, true, true},
    {192, 128, true, false, false},  // MLA's core: 128 nope + 64 rotary dims for q·k, 128 for values
};

constexpr const HeadDims* find_head_dims(int64_t dqk, int64_t dv) {
  for (const HeadDims& h : kHeadDims)
    if (h.dqk == dqk && h.dv == dv) return &h;
  return nullptr;
}

constexpr bool head_dims_supported(AttnKernel kernel, int64_t dqk, int64_t dv) {
  const HeadDims* h = find_head_dims(dqk, dv);
  return h != nullptr && (kernel == AttnKernel::flash || (kernel == AttnKernel::dma && h->dma) ||
                          (kernel == AttnKernel::nsa && h->nsa));
}

constexpr bool head_dims_wgmma(int64_t dqk, int64_t dv) {
  const HeadDims* h = find_head_dims(dqk, dv);
  return h != nullptr && h->wgmma;
}

constexpr bool head_dims_dma(int64_t dqk, int64_t dv) {
  const HeadDims* h = find_head_dims(dqk, dv);
  return h != nullptr && h->dma;
}

constexpr bool head_dims_nsa(int64_t dqk, int64_t dv) {
  const HeadDims* h = find_head_dims(dqk, dv);
  return h != nullptr && h->nsa;
}

// The pairs a kernel family supports, for messages: "32/32, 64/64, 128/128, 192/128".
inline std::string head_dims_list(AttnKernel kernel) {
  std::string s;
  for (const HeadDims& h : kHeadDims) {
    if ((kernel == AttnKernel::dma && !h.dma) || (kernel == AttnKernel::nsa && !h.nsa)) continue;
    if (!s.empty()) s += ", ";
    s += std::to_string(h.dqk) + "/" + std::to_string(h.dv);
  }
  return s;
}

// Runtime head dims to template arguments (FlashAttention-2's HEADDIM_SWITCH, over the table):
// calls f(std::integral_constant<int, DQK>{}, std::integral_constant<int, DV>{}) for the row
// (dqk, dv) and returns true; false, f not called, where the table has no such row.
template <std::size_t I = 0, class F>
bool head_dims_switch(int64_t dqk, int64_t dv, F&& f) {
  if constexpr (I < std::extent_v<decltype(kHeadDims)>) {
    constexpr HeadDims h = kHeadDims[I];
    if (dqk == h.dqk && dv == h.dv) {
      f(std::integral_constant<int, h.dqk>{}, std::integral_constant<int, h.dv>{});
      return true;
    }
    return head_dims_switch<I + 1>(dqk, dv, std::forward<F>(f));
  } else {
    return false;
  }
}

}  // namespace dmat::cuda
