#include "train/info.h"

#include <fmt/format.h>

#include "model/attention.h"
#include "model/model.h"

namespace dmat {

ModelCounts count_model(const ModelConfig& m, int64_t T) {
  ModelCounts c;
  ParamTable t = Model::declare_params(m);
  for (const auto& p : t.info()) {
    c.by_group[p.group] += p.shape.numel();
    c.total += p.shape.numel();
  }
  const int64_t emb = c.by_group["embedding"], head = c.by_group.count("head") ? c.by_group["head"] : 0;
  c.non_embedding = c.total - emb - head;
  const auto attn = make_attention(m);
  // parameters not applied once per token (NSA's compression MLPs): their FLOPs are in the core's
  const double per_block = double(m.n_layers) * double(attn->params_not_per_token());
  c.flops_per_token =
      6.0 * (double(c.total) - per_block) + double(m.n_layers) * attn->mfu_core_flops_per_token(T, m.d_model);
  c.flops_convention = attn->mfu_convention();
  const double lm_head = double(m.vocab_size) * double(m.d_model);  // tied or not, the head is a matmul
  c.matmul_flops_per_token = 6.0 * (double(c.non_embedding) - per_block + lm_head) +
                             3.0 * double(m.n_layers) * attn->core_flops_per_token(T);
  return c;
}

MemoryEstimate estimate_memory(const Config& c, Device device, int ranks) {
  MemoryEstimate e;
  const int64_t padded = Model::declare_params(c.model).table().total_elements();
  // the elements whose AdamW moments this rank keeps (ZeRO-1: its shard of the flat arena)
  const int64_t moment_elems = c.train.zero == 1 && ranks > 1 ? (padded + ranks - 1) / ranks : padded;
  const int64_t B = c.train.batch_size, T = c.train.seq_len, N = B * T;
  if (device == Device::CPU) {
    e.params = padded * 4;
    e.grads = padded * 4;
    e.optimizer = 2 * moment_elems * 4;
    e.activations = int64_t(Model::activation_bytes(c.model, B, T, DType::F32, c.train.recompute));
    return e;
  }
  e.params = padded * 2;         // bf16 working copy
  e.grads = padded * 4;          // fp32
  e.optimizer = padded * 4 + 2 * moment_elems * 4;  // fp32 master weights (whole) + two moments
  e.activations = int64_t(Model::activation_bytes(c.model, B, T, DType::BF16, c.train.recompute));
  const int64_t H = c.model.n_heads;
  const AttentionDims d = make_attention(c.model)->dims();
  int64_t ws = 32ll << 20;                             // cuBLASLt workspace
  ws += B * H * T * 4;                                 // attention backward: rowsum(dO∘O)
  if (!c.run.deterministic) ws += N * H * d.d_qk * 4;  // attention backward: fp32 dQ accumulator
  ws += 2 * ((N + 63) / 64 * 64) * 4;                  // tokens and targets
  ws += T * d.rope_dim * 4 + (4ll << 20);              // RoPE table (cos, sin of rope_dim / 2 angles), reduction partials
  e.workspace = ws;
  return e;
}

static std::string human(double x) {
  if (x >= 1e9) return fmt::format("{:.3f}B", x / 1e9);
  if (x >= 1e6) return fmt::format("{:.3f}M", x / 1e6);
  if (x >= 1e3) return fmt::format("{:.1f}K", x / 1e3);
  return fmt::format("{:.0f}", x);
}

static std::string gib(int64_t b) { return fmt::format("{:.3f} GiB", double(b) / double(1ull << 30)); }

std::string describe(const Config& c) {
  const auto& m = c.model;
  const ModelCounts k = count_model(m, c.train.seq_len);
  std::string s;
  // the attention variant with its own options, as the resolved config writes them
  std::string attn;
  const nlohmann::json resolved = to_json(c);  // named: a range-for over a temporary's member dangles
  for (const auto& [key, value] : resolved["model"]["attention"].items())
    if (key != "type") attn += fmt::format("{}{} {}", attn.empty() ? "" : ", ", key,
                                           value.is_string() ? value.get<std::string>() : value.dump());
  s += fmt::format("model: d_model {}, {} layers, {} heads / {} kv heads, head_dim {}, ffn {}, vocab {}, {} "
                   "embeddings, attention {}{}\n",
                   m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size,
                   m.tie_embeddings ? "tied" : "untied", m.attention.type, attn.empty() ? "" : " (" + attn + ")");
  s += "parameters:\n";
  for (const auto& [g, n] : k.by_group) s += fmt::format("  {:<12} {:>14} ({})\n", g, n, human(double(n)));
  s += fmt::format("  {:<12} {:>14} ({})\n", "total", k.total, human(double(k.total)));
  s += fmt::format("  {:<12} {:>14} ({})  [total minus token embedding and untied LM head]\n", "non-embedding",
                   k.non_embedding, human(double(k.non_embedding)));
  s += fmt::format("FLOPs per token at T={}:\n", c.train.seq_len);
  const double core = make_attention(m)->mfu_core_flops_per_token(c.train.seq_len, m.d_model);
  const int64_t per_block = m.n_layers * make_attention(m)->params_not_per_token();
  s += fmt::format("  {:.6g}  MFU convention (docs/performance.md; MLA: DeepSeek's accounting of its wider core; NSA: its "
                   "compression MLPs as run): {} = 6·{} + {}·{:.6g}\n",
                   k.flops_per_token, k.flops_convention, k.total - per_block, m.n_layers, core);
  s += fmt::format("  {:.6g}  executed matmuls, forward + backward (6·(N_non-emb + V·d) + 3·attention core; NSA: "
                   "6·(N_non-emb − N_cmp + V·d) + 3·(cores and compression MLPs as run))\n",
                   k.matmul_flops_per_token);
  const double tokens = double(c.train.steps) * double(c.train.batch_size * c.train.grad_accum * c.train.seq_len);
  s += fmt::format("training: {} steps × {} tokens/step (1 rank) = {} tokens, {:.3g} FLOPs (MFU convention), {:.1f} "
                   "tokens per parameter\n",
                   c.train.steps, c.train.batch_size * c.train.grad_accum * c.train.seq_len, human(tokens),
                   tokens * k.flops_per_token, tokens / double(k.total));
  const MemoryEstimate e = estimate_memory(c, Device::CPU);
  s += fmt::format("memory estimate (CPU fp32 backend, micro-batch {}×{}{}): params {}, grads {}, AdamW {}, "
                   "activations {}, total {}\n",
                   c.train.batch_size, c.train.seq_len, c.train.recompute ? ", recompute" : "", gib(e.params),
                   gib(e.grads), gib(e.optimizer), gib(e.activations), gib(e.total()));
  const MemoryEstimate g = estimate_memory(c, Device::CUDA);
  s += fmt::format("memory estimate (CUDA bf16 backend, per GPU, micro-batch {}×{}{}): bf16 weights {}, fp32 grads {}, "
                   "fp32 master + AdamW {}, activations {}, workspace {}, total {} (plus the CUDA context)\n",
                   c.train.batch_size, c.train.seq_len, c.train.recompute ? ", recompute" : "", gib(g.params),
                   gib(g.grads), gib(g.optimizer), gib(g.activations), gib(g.workspace), gib(g.total()));
  Config z = c;
  z.train.zero = 1;
  const MemoryEstimate z2 = estimate_memory(z, Device::CUDA, 2), z4 = estimate_memory(z, Device::CUDA, 4),
                       z8 = estimate_memory(z, Device::CUDA, 8);
  s += fmt::format("  with ZeRO-1 (train.zero: 1), per GPU: {} at 2 ranks, {} at 4, {} at 8 (the AdamW moments "
                   "sharded; NCCL's buffers not included)\n",
                   gib(z2.total()), gib(z4.total()), gib(z8.total()));
  return s;
}

nlohmann::json describe_json(const Config& c) {
  const ModelCounts k = count_model(c.model, c.train.seq_len);
  const int64_t per_step = c.train.batch_size * c.train.grad_accum * c.train.seq_len;
  nlohmann::json groups = nlohmann::json::object();
  for (const auto& [g, n] : k.by_group) groups[g] = n;
  // why the CUDA backend cannot run this model yet ("" when it can): launchers on a GPU machine
  // (scripts/ladder.py) list such a variant as not available there instead of starting it
  const std::string cuda_why = make_attention(c.model)->cuda_unsupported();
  return {{"config", c.resolved},
          {"cuda_unsupported", cuda_why.empty() ? nlohmann::json(nullptr) : nlohmann::json(cuda_why)},
          {"params", {{"total", k.total}, {"non_embedding", k.non_embedding}, {"by_group", groups}}},
          {"flops_per_token", {{"mfu_convention", k.flops_per_token}, {"executed_matmuls", k.matmul_flops_per_token}}},
          {"tokens_per_step", per_step},
          {"tokens", per_step * c.train.steps},
          {"memory_bytes",
           {{"cpu", estimate_memory(c, Device::CPU).total()}, {"cuda", estimate_memory(c, Device::CUDA).total()}}}};
}

}  // namespace dmat
