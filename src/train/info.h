// `dmatrain info`: parameter counts by group, FLOPs per token and a memory estimate, computed from
// the same parameter and activation tables the model allocates.
#pragma once
#include <cstdint>
#include <map>
#include <string>

#include "config/config.h"
#include "core/tensor.h"

namespace dmat {

struct ModelCounts {
  std::map<std::string, int64_t> by_group;  // embedding, attention, mlp, norm, residual, head
  int64_t total = 0;
  int64_t non_embedding = 0;  // total minus the token embedding and an untied LM head
  // MFU convention (docs/performance.md): 6·N + 6·L·T·d with N = total parameters, d = d_model; MLA counts
  // its wider core, 6·N + 3·L·T·H·(d_qk + d_v); NSA leaves its compression MLPs (N_cmp parameters,
  // run once per block) out of 6·N and counts them as run: 6·(N − N_cmp) + L·(6·T·d + 3·C_cmp).
  // flops_convention names the formula used.
  double flops_per_token = 0;
  std::string flops_convention;
  // Matmul FLOPs actually executed per token (forward + backward = 3 × forward): projections,
  // MLP and LM head 6·(N − embedding), plus the attention core as run (NSA: its three cores and
  // compression MLPs, the MLPs' parameters left out of the 6·N term).
  double matmul_flops_per_token = 0;
};

ModelCounts count_model(const ModelConfig& m, int64_t seq_len);

struct MemoryEstimate {
  // optimizer: AdamW moments, plus the fp32 master weights on CUDA; workspace: CUDA scratch
  // (cuBLASLt, attention backward, tokens, reductions).
  int64_t params = 0, grads = 0, optimizer = 0, activations = 0, workspace = 0;
  int64_t total() const { return params + grads + optimizer + activations + workspace; }
};
// Memory of one rank for one micro-batch (train.batch_size × seq_len), from the tables the model
// allocates. CPU: fp32 everything. CUDA: bf16 weights and activations (statistics fp32), fp32
// master weights, gradients and moments, plus the kernels' workspaces; the CUDA context itself
// (~0.5 GiB, driver-dependent) is not included. `dmatrain bench` prints this beside what it measures.
// ranks > 1 with train.zero = 1: the AdamW moments of one shard (1/ranks of the flat arena, rounded
// up) per rank; the fp32 master weights stay whole on every rank. NCCL's own buffers are not included.
MemoryEstimate estimate_memory(const Config& c, Device device = Device::CPU, int ranks = 1);

std::string describe(const Config& c);

// The same facts as describe(), machine-readable (`dmatrain info --json`, read by scripts/ladder.py):
// {"config": the resolved config, "params": {"total", "non_embedding", "by_group"},
//  "flops_per_token": {"mfu_convention", "executed_matmuls"}, "tokens_per_step", "tokens",
//  "memory_bytes": {"cpu", "cuda"}} (one rank, one micro-batch).
nlohmann::json describe_json(const Config& c);

}  // namespace dmat
