// `dmatrain info`: parameter counts by group, FLOPs per token and a memory estimate, computed from
// the same parameter and activation tables the model allocates.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "config/config.h"

namespace dmat {

struct ModelCounts {
  std::map<std::string, int64_t> by_group;  // embedding, attention, mlp, norm, residual, head
  int64_t total = 0;
  int64_t non_embedding = 0;  // total minus the token embedding and an untied LM head
  // MFU convention of DESIGN.md: 6·N + 6·L·T·d with N = total parameters, d = d_model.
  double flops_per_token = 0;
  // Matmul FLOPs actually executed per token (forward + backward = 3 × forward): projections,
  // MLP and LM head 6·(N − embedding), plus the causal attention core.
  double matmul_flops_per_token = 0;
};

ModelCounts count_model(const ModelConfig& m, int64_t seq_len);

struct MemoryEstimate {
  int64_t params = 0, grads = 0, optimizer = 0, activations = 0;
  int64_t total() const { return params + grads + optimizer + activations; }
};
// The CPU fp32 backend: parameters, gradients, two AdamW moments, activations of one micro-batch.
MemoryEstimate estimate_memory(const Config& c);

std::string describe(const Config& c);

}  // namespace dmat
