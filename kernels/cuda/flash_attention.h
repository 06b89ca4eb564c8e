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

}  // namespace dmat::cuda
