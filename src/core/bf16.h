// bfloat16 as a storage type on the host: the CUDA backend keeps weights and activations in bf16,
// and the host converts when it uploads, checkpoints or checks them. Conversion rounds to nearest,
// ties to even (as __float2bfloat16_rn does), and keeps NaN a NaN.
#pragma once
#include <cstdint>
#include <cstring>

namespace dmat {

struct bf16 {
  uint16_t bits = 0;
};

inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

inline float to_float(bf16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace dmat
