// AdamW over the flat fp32 master / gradient / moment arenas in one launch for all tensors: the
// segment table is cut on the host into chunks of at most kChunk elements (a block each), uploaded
// once and cached (keyed by the host table's address and count, checked against its contents).
// Per element, torch.optim.AdamW's order exactly as cpu::adamw_step; the fp32 master is updated
// and then rounded once to the bf16 working copy p.
#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"

namespace dmat::cuda {
namespace {

using namespace detail;

constexpr int kThreads = 256;
constexpr int64_t kChunk = int64_t(kThreads) * 16;

struct Chunk {
  int64_t offset;  // first element in the arenas
  int32_t n;       // elements (≤ kChunk)
  float weight_decay;
};

struct Consts {
  float lr, b1, one_m_b1, b2, one_m_b2, sqrt_bc2, step, eps, grad_scale;
};

__device__ __forceinline__ void adam_one(float& master, float& m, float& v, float g, float decay, const Consts& k) {
  g *= k.grad_scale;
  const float mi = k.b1 * m + k.one_m_b1 * g;
  const float vi = k.b2 * v + k.one_m_b2 * g * g;
  m = mi;
  v = vi;
  master = master * decay - k.step * mi / (sqrtf(vi) / k.sqrt_bc2 + k.eps);
}

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* master, nv_bf16* p, const float* g, float* m, float* v, const Chunk* chunks, Consts k,
                 bool vec_ok) {
  const Chunk c = chunks[blockIdx.x];
  // 1 − lr·wd in double as the CPU reference folds it; explicit roundings forbid an FMA.
  const float decay = float(__dsub_rn(1.0, __dmul_rn(double(k.lr), double(c.weight_decay))));
  const int64_t base = c.offset;
  if (vec_ok && (base & 3) == 0) {
    for (int i = threadIdx.x * 4; i < c.n; i += kThreads * 4) {
      const int64_t o = base + i;
      if (i + 4 <= c.n) {
        float4 w = *reinterpret_cast<const float4*>(master + o);
        float4 mm = *reinterpret_cast<const float4*>(m + o);
        float4 vv = *reinterpret_cast<const float4*>(v + o);
        const float4 gg = *reinterpret_cast<const float4*>(g + o);
        adam_one(w.x, mm.x, vv.x, gg.x, decay, k);
        adam_one(w.y, mm.y, vv.y, gg.y, decay, k);
        adam_one(w.z, mm.z, vv.z, gg.z, decay, k);
        adam_one(w.w, mm.w, vv.w, gg.w, decay, k);
        *reinterpret_cast<float4*>(master + o) = w;
        *reinterpret_cast<float4*>(m + o) = mm;
        *reinterpret_cast<float4*>(v + o) = vv;
        __nv_bfloat162 h[2] = {__floats2bfloat162_rn(w.x, w.y), __floats2bfloat162_rn(w.z, w.w)};
        *reinterpret_cast<uint2*>(p + o) = *reinterpret_cast<const uint2*>(h);
      } else {
        for (int j = 0; j < 4 && i + j < c.n; ++j) {
          adam_one(master[o + j], m[o + j], v[o + j], g[o + j], decay, k);
          st(p + o + j, master[o + j]);
        }
      }
    }
  } else {
    for (int i = threadIdx.x; i < c.n; i += kThreads) {
      const int64_t o = base + i;
      float w = master[o], mm = m[o], vv = v[o];
      adam_one(w, mm, vv, g[o], decay, k);
      master[o] = w, m[o] = mm, v[o] = vv;
      st(p + o, w);
    }
  }
}

// The uploaded chunk table for one host segment table.
struct ChunkTable {
  const AdamSegment* host = nullptr;
  std::vector<AdamSegment> copy;
  Chunk* dev = nullptr;
  int64_t count = 0;
};

bool same(const std::vector<AdamSegment>& a, const AdamSegment* b, int n) {
  if (int(a.size()) != n) return false;
  for (int i = 0; i < n; ++i)
    if (a[size_t(i)].offset != b[i].offset || a[size_t(i)].n != b[i].n ||
        std::memcmp(&a[size_t(i)].weight_decay, &b[i].weight_decay, sizeof(float)) != 0)
      return false;
  return true;
}

const ChunkTable& chunk_table(const AdamSegment* segs, int nsegs) {
  static std::mutex mu;
  static std::vector<ChunkTable>* cache = new std::vector<ChunkTable>();
  std::lock_guard<std::mutex> lock(mu);
  for (const ChunkTable& t : *cache)
    if (t.host == segs && same(t.copy, segs, nsegs)) return t;
  std::vector<Chunk> chunks;
  for (int s = 0; s < nsegs; ++s) {
    DMAT_CHECK(segs[s].offset >= 0 && segs[s].n >= 0, "adamw_step: segment {} has offset {} n {}", s,
               segs[s].offset, segs[s].n);
    for (int64_t i = 0; i < segs[s].n; i += kChunk)
      chunks.push_back(Chunk{segs[s].offset + i, int32_t(std::min(kChunk, segs[s].n - i)), segs[s].weight_decay});
  }
  DMAT_CHECK(int64_t(chunks.size()) < (int64_t(1) << 31), "adamw_step: {} chunks", chunks.size());
  ChunkTable t;
  t.host = segs;
  t.copy.assign(segs, segs + nsegs);
  t.count = int64_t(chunks.size());
  if (!chunks.empty()) {
    t.dev = static_cast<Chunk*>(device_alloc(chunks.size() * sizeof(Chunk)));
    memcpy_h2d(t.dev, chunks.data(), chunks.size() * sizeof(Chunk));
  }
  // A table whose host array was changed in place is replaced, not kept forever.
  for (auto it = cache->begin(); it != cache->end(); ++it)
    if (it->host == segs) {
      DMAT_CUDA_CHECK(cudaStreamSynchronize(stream()));  // the old table may be in use
      device_free(it->dev);
      cache->erase(it);
      break;
    }
  cache->push_back(std::move(t));
  return cache->back();
}

}  // namespace

void adamw_step(float* master, bf16* p, const float* g, float* m, float* v, const AdamSegment* segs, int nsegs,
                float lr, float beta1, float beta2, float eps, float bc1, float bc2, float grad_scale) {
  if (nsegs <= 0) return;
  const ChunkTable& t = chunk_table(segs, nsegs);
  if (t.count == 0) return;
  // Constants folded in double and rounded once, as cpu::adamw_step does.
  Consts k;
  k.lr = lr;
  k.b1 = float(double(beta1));
  k.one_m_b1 = float(1.0 - double(beta1));
  k.b2 = float(double(beta2));
  k.one_m_b2 = float(1.0 - double(beta2));
  k.sqrt_bc2 = float(std::sqrt(double(bc2)));
  k.step = float(double(lr) / double(bc1));
  k.eps = eps;
  k.grad_scale = grad_scale;
  const bool vec_ok = aligned16(master) && aligned16(g) && aligned16(m) && aligned16(v) &&
                      (reinterpret_cast<uintptr_t>(p) & 7u) == 0;
  adamw_kernel<<<unsigned(t.count), kThreads, 0, stream()>>>(master, nv(p), g, m, v, t.dev, k, vec_ok);
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace dmat::cuda
