// `dmatrain bench attention`: times our flash attention (forward, forward + backward) on one
// shape with CUDA events (warm-up, then the median of `iters` runs) and prints one JSON line.
// Flop convention (shared/anchors/attention.py): causal forward 4·B·H·N²·D/2, forward + backward
// 3.5× that; with a window, the visible (query, key) pairs replace N²/2. Without the CUDA backend
// it throws dmat::Error. The kernel path (mma.sync, or the Hopper wgmma kernels) is `path`, or with
// "auto" the library's choice (DMAT_ATTN_PATH=mma|wgmma overrides it; `dmatrain bench attention`
// takes it from there; "auto" picks per direction), and the JSON line names both.
// With dma = w: the DMA ops (kernels/cuda/dma.h) on iid normal key biases per (b, KV head), as the
// FlexAttention anchor builds them (or the pattern dma_bias names); forward = thresholds + lists + sparse forward, forward +
// backward adds lists, key groups and the sparse backward. Flops count the kept pairs (w per query
// from query w − 1 on), and the line reports the process's scratch workspace after the run.
// With nsa: Native Sparse Attention's core (kernels/cuda/nsa.h; window = w, default 512; the paper's
// l, d, l', n = 32, 16, 64, 16, compression MLP width D) on random inputs, without the projections:
// forward = both compression MLPs, the compressed keys' RoPE, compressed attention, selection,
// selected attention, window attention (flash, sliding window) and gates; forward + backward adds
// every backward but the selection's. Per-part forward times, the executed core FLOPs
// (cpu::nsa_core_flops_per_token), and the workspace the run grew (cuda::workspace_bytes) beside the
// layer's saved selection lists.
#pragma once
#include <cstdint>
#include <ostream>
#include <string>

namespace dmat {

struct AttnBenchOptions {
  int64_t B = 1, H = 16, Hkv = 16, T = 16384, D = 128, window = 0;  // D: the head_dims.h pair with d_qk = D (192: 192/128)
  int64_t dma = 0;  // > 0: Dynamic Mask Attention keeping this many keys per query (window must be 0)
  bool nsa = false;  // Native Sparse Attention (window: its window branch's w, 0: 512)
  // DMA key biases: "normal" (iid N(0, 1), the anchor's), "increasing" / "decreasing" with position
  // (the thresholds' adversarial orders), "tied" (all equal: every tile takes the dense fallback)
  std::string dma_bias = "normal";
  bool deterministic = true;
  int iters = 10;
  std::string path = "auto";  // kernel path: auto, mma, wgmma
};

void bench_attention(const AttnBenchOptions& o, std::ostream& out);

}  // namespace dmat
