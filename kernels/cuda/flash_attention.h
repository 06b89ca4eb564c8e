// Our flash attention (forward and backward) on tensor cores: causal, grouped KV heads, sliding
// window, d_qk and d_v in {64, 128} plus (192, 128) for MLA. Semantics are cpu::attention_* with
// bf16 q, k, v, out, dq, dk, dv and fp32 lse [B,H,T] (natural log of Σ_j exp(s_ij)).
// Layout: q [B,T,H,Dqk], k [B,T,Hkv,Dqk], v [B,T,Hkv,Dv], out [B,T,H,Dv], row-major.
#pragma once
#include <cstdint>

#include "core/bf16.h"
#include "kernels/cpu/cpu_ops.h"  // AttnShape

namespace dmat::cuda {

using AttnShape = cpu::AttnShape;

bool flash_attention_supported(const AttnShape& s);  // head dims the kernels are built for
void flash_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                             const AttnShape& s);
// dq, dk, dv overwrite. deterministic = true: no floating-point atomics (dQ in its own pass);
// false may use fp32 atomics for dQ (faster; run-to-run bits may differ).
void flash_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                              const bf16* q, const bf16* k, const bf16* v, const AttnShape& s, bool deterministic);

// ---- hooks for the sparse variants (DMA, NSA): forward only for now ----------------------------
// Queries per tile of the forward kernel; a gathered key list is given per tile of this many.
int flash_attention_block_q();
// Gathered keys: keys[((b·Hkv + hk)·n_tiles + tile)·capacity + n], n < count[(b·Hkv + hk)·n_tiles
// + tile], n_tiles = ceil(T / flash_attention_block_q()); key positions, each still masked per
// element by causality and the window (so a superset of the visible keys is always correct).
struct FlashGather {
  const int32_t* keys = nullptr;
  const int32_t* count = nullptr;
  int64_t capacity = 0;
};
// flash_attention_forward with an optional per-key additive fp32 bias (s_ij = scale·q_i·k_j +
// key_bias[(b·Hkv + hk)·T + j], natural-log units, nullptr: none) and an optional gathered key
// list (nullptr: every causal / windowed key).
void flash_attention_forward_ext(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                 const AttnShape& s, const float* key_bias, const FlashGather* gather);

}  // namespace dmat::cuda
