// Types both kernel backends share: the attention shape, DMA's bias form and NSA's shape. The CPU
// reference (kernels/cpu/cpu_ops.h, nsa_ops.h) defines their semantics; the CUDA headers take them
// from here, not from the CPU headers.
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

// Native Sparse Attention's sizes (kernels/cpu/nsa_ops.h: the layouts, nsa_check_shape its rules).
// Layouts: q, o [B,T,H,D]; k, v of every branch [B,T,Hkv,D]; compressed kc, vc [B,Nc,Hkv,D]; lse of
// every branch [B,H,T]; selection lists [B,Hkv,T,sel_count] (int32).
struct NsaShape {
  int64_t B = 0, T = 0, H = 0, Hkv = 0, D = 0;  // D: the head dim of q, k and v in every branch
  double scale = 0;                             // score scale of every branch, usually 1/sqrt(D)
  int64_t cmp_block = 32;   // l:  compression block length
  int64_t cmp_stride = 16;  // d:  compression stride; block c covers positions [c·d, c·d + l)
  int64_t sel_block = 64;   // l': selection block length; block j covers [j·l', (j+1)·l')
  int64_t sel_count = 16;   // n:  selected blocks per query (forced blocks included)
  int64_t window = 512;     // w:  the window branch sees keys t−w+1 … t

  // Complete compression blocks in a sequence of T positions (only complete blocks exist).
  int64_t n_cmp() const { return T >= cmp_block ? (T - cmp_block) / cmp_stride + 1 : 0; }
  // Compression blocks visible to query t: those ending at or before t (c·d + l − 1 <= t).
  int64_t cmp_visible(int64_t t) const { return t + 1 >= cmp_block ? (t + 1 - cmp_block) / cmp_stride + 1 : 0; }
  // Selection blocks of the sequence (the last may be partial).
  int64_t n_sel() const { return (T + sel_block - 1) / sel_block; }
};

}  // namespace dmat
