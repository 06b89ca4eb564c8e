// The attention interface every variant implements (MHA/GQA, SWA, DMA, MLA, NSA).
// A variant owns its parameters (declared under `prefix`), declares the activations it saves for
// backward, runs forward and backward on the block's normalised input, and says what its core
// asks of the kernels (head dims and kernel family), which the model, the trainer's pre-check
// and `dmatrain info` read instead of model.head_dim.
//
// Adding a variant: its layer in a file of its own (attention_<name>.cpp) with a factory declared
// below and named in make_attention, its entry in the config (config.h / config.cpp), its kernels.
// Incremental decoding (make_decode_cache / decode) is optional: without it `dmatrain generate`
// refuses the variant with a message naming it.
#pragma once
#include <initializer_list>
#include <memory>
#include <string>

#include "config/config.h"
#include "core/arena.h"
#include "kernels/cuda/head_dims.h"
#include "model/params.h"

namespace dmat {

// What a layer sees while running: the model's arenas and the micro-batch shape.
struct LayerCtx {
  const Arena* params = nullptr;
  const Arena* grads = nullptr;
  const Arena* acts = nullptr;
  int64_t B = 0, T = 0;
  bool deterministic = true;  // CUDA kernels without float atomics
  Tensor P(int h) const { return params->get(h); }
  Tensor G(int h) const { return grads->get(h); }
  Tensor A(int h) const { return acts->get(h); }
};

// The core's shape per query head: scores over d_qk dims, of which RoPE rotates the last rope_dim
// (all of them when rope_dim = d_qk), weighted sums of d_v dims; and the CUDA kernel family that
// runs it (kernels/cuda/head_dims.h lists the (d_qk, d_v) pairs each family is built for).
struct AttentionDims {
  int64_t d_qk = 0, d_v = 0, rope_dim = 0;
  cuda::AttnKernel kernel = cuda::AttnKernel::flash;
};

// Incremental decoding (`dmatrain generate`; CPU backend, one sequence): what a variant keeps of the
// positions decoded so far (keys and values, or what it derives them from), for up to `capacity`
// positions. A cache belongs to the weights it was made with.
class DecodeCache {
 public:
  virtual ~DecodeCache() = default;
  int64_t len = 0;       // positions held (the next one decoded is position len)
  int64_t capacity = 0;  // positions it can hold
  std::string what;      // what is cached per position, e.g. "k, v: 2 × 64 values each"
  int64_t values_per_position = 0;
  // Forgets positions new_len … len − 1 (0 <= new_len <= len): the cache is then as it was when it
  // held new_len positions, and the next position decoded is new_len (scoring several continuations
  // of one prefix). Rows past new_len are simply overwritten later; a cache with state beyond its
  // rows (DMA's running top-w, NSA's count of compressed blocks) restores that too.
  virtual void rewind(int64_t new_len);
};

// Host tensors for one decoding step: the given shapes in one arena of dtype.
class DecodeScratch {
 public:
  DecodeScratch(DType dtype, std::initializer_list<Shape> shapes);
  Tensor operator[](int i) const { return arena_.get(i); }

 private:
  Arena arena_;
};

class Attention {
 public:
  virtual ~Attention() = default;
  virtual AttentionDims dims() const = 0;
  // Why the CUDA backend cannot train this layer as configured, naming the config keys to change
  // ("" when it can). Read before a run starts (trainer) and when a CUDA model is built.
  virtual std::string cuda_unsupported() const = 0;
  virtual void declare_params(ParamTable& t, const std::string& prefix) = 0;
  // Saved activations (per layer: unique names under prefix) and scratch (shared names).
  virtual void declare_acts(TensorTable& t, const std::string& prefix, int64_t B, int64_t T) = 0;
  // x: [B·T, d_model] normalised block input; out: [B·T, d_model] (overwrite).
  virtual void forward(const LayerCtx& c, const Tensor& x, const Tensor& out) = 0;
  // dout: gradient of out; dx: gradient of x (overwrite). Parameter gradients accumulate.
  virtual void backward(const LayerCtx& c, const Tensor& x, const Tensor& dout, const Tensor& dx) = 0;
  // Forward FLOPs per token of the attention core (scores and weighted sum) at sequence length T,
  // for `dmatrain info` (projections are counted with the parameters).
  virtual double core_flops_per_token(int64_t T) const = 0;
  // The core's training FLOPs per token (one layer) in the MFU convention (docs/performance.md: 6·N + 6·L·T·d):
  // the dense causal core at width d_model, whatever keys the variant visits. MLA counts its wider
  // core (DeepSeek's accounting, attention_mla.cpp).
  virtual double mfu_core_flops_per_token(int64_t T, int64_t d_model) const {
    return 6.0 * double(T) * double(d_model);
  }
  // The resulting model formula, for messages.
  virtual std::string mfu_convention() const { return "6·N + 6·L·T·d"; }
  // Parameters of the layer that are not applied once per token (NSA's compression MLPs run once
  // per block and KV head; their position embeddings are added, not multiplied): `dmatrain info`
  // leaves them out of 6·N, and the layer counts their FLOPs as run in core_flops_per_token and
  // mfu_core_flops_per_token. 0 for every other variant.
  virtual int64_t params_not_per_token() const { return 0; }

  // Incremental decoding (CPU). make_decode_cache: an empty cache for up to max_len positions, in
  // the dtype of c's parameters. decode: x [n, d_model] holds the normalised block inputs of
  // positions cache.len … cache.len + n − 1; out [n, d_model] (overwrite) gets what forward() computes
  // at those positions given the cached earlier ones (n > 1: a prompt at once, causal within it);
  // the positions join the cache (len += n). The defaults refuse.
  virtual std::unique_ptr<DecodeCache> make_decode_cache(const LayerCtx& c, int64_t max_len) const;
  virtual void decode(const LayerCtx& c, DecodeCache& cache, const Tensor& x, const Tensor& out) const;
};

std::unique_ptr<Attention> make_attention(const ModelConfig& cfg);
// The variants in files of their own (make_attention picks by model.attention.type).
std::unique_ptr<Attention> make_dma_attention(const ModelConfig& cfg);  // attention_dma.cpp
std::unique_ptr<Attention> make_mla_attention(const ModelConfig& cfg);  // attention_mla.cpp
std::unique_ptr<Attention> make_nsa_attention(const ModelConfig& cfg);  // attention_nsa.cpp

// cuda_unsupported() of the variants whose q, k and v heads all have model.head_dim dims, run by
// `kernel`: "" or "model.head_dim 48 has no CUDA attention kernel (...)".
std::string cuda_unsupported_head_dim(const ModelConfig& cfg, cuda::AttnKernel kernel);

}  // namespace dmat
