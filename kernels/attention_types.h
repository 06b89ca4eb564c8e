// Types both kernel backends share: the attention shape and DMA's bias form. The CPU reference
// (kernels/cpu/cpu_ops.h) defines their semantics; the CUDA headers take them from here, not
// from the CPU header.
#pragma once
#include <cstdint>

namespace dmat {

// Causal attention with grouped KV heads: B batches of T positions, H query heads reading Hkv KV
// heads, head dims Dqk (queries, keys) and Dv (values). Semantics in cpu_ops.h, attention_forward.
struct AttnShape {
  int64_t B = 0, T = 0, H = 0, Hkv = 0, Dqk = 0, Dv = 0;
  double scale = 0;   // usually 1/sqrt(Dqk)
  int64_t window = 0; // 0: full causal; w > 0 keeps keys i-w+1 … i
  bool deterministic = true;  // CUDA backward: no float atomics (the CPU kernels always are)
};

// Dynamic Mask Attention's bias from its gate z (cpu_ops.h, dma_bias_forward).
enum class DmaBiasForm { Exp, Linear };

}  // namespace dmat
