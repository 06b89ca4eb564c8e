// Native Sparse Attention's CUDA ops (declarations, semantics and workspace in nsa.h): the
// compression MLP around cuBLASLt GEMMs, the compressed keys' RoPE, the selection (fp64 scores,
// fixed-point importances, top-n), the selected branch's tile lists and their transpose, the gates,
// and the drivers of the attention kernels (nsa_attention_sm80.cu).
#include <algorithm>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>
#include <tuple>

#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include "core/error.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/nsa.h"
#include "kernels/cuda/nsa_flash.cuh"
#include "kernels/cuda/nsa_limits.h"

namespace dmat::cuda {
namespace {

using detail::ceil_div;
using detail::grid_for;
using detail::ld;
using detail::load8;
using detail::load8f;
using detail::nv;
using detail::nv_bf16;
using detail::st;
using detail::store8;
using nsa::kNsaKeyTile;
using nsa::kNsaRows;
using nsa::NsaAttnParams;

constexpr int kThreads = 256;

// σ(z) without overflow (as the CPU reference and dma.cu).
__device__ __forceinline__ float sigmoid(float z) {
  if (z >= 0.f) return 1.f / (1.f + expf(-z));
  const float e = expf(z);
  return e / (1.f + e);
}

// Bump allocation inside one workspace buffer: sizes first (base == nullptr), then pointers.
struct Carve {
  char* base = nullptr;
  size_t off = 0;
  template <class T>
  T* take(int64_t n) {
    off = (off + 255) & ~size_t(255);
    T* r = base ? reinterpret_cast<T*>(base + off) : nullptr;
    off += size_t(std::max<int64_t>(n, 0)) * sizeof(T);
    return r;
  }
};

void check_shape(const NsaShape& s, const char* op) {
  const std::string why = nsa_cuda_unsupported(s);
  if (!why.empty()) fail("{}: {}", op, why);
  DMAT_CHECK(s.B >= 1 && s.B <= 65535 && s.T >= 1 && s.T < (int64_t(1) << 30) && s.Hkv <= 65535 && s.cmp_stride > 0 &&
                 s.cmp_block % s.cmp_stride == 0 && s.sel_block % s.cmp_stride == 0 && s.sel_count >= 3 &&
                 s.scale > 0,
             "{}: shape B {} T {} H {} Hkv {} l {} d {} l' {} n {} scale {}", op, s.B, s.T, s.H, s.Hkv, s.cmp_block,
             s.cmp_stride, s.sel_block, s.sel_count, s.scale);
}

// The attention kernels move q, k, v and dout rows by 16-byte cp.async and store pairs of outputs,
// the compression's gather and scatter 8 values at a time: their tensors must be 16-byte aligned
// (the arena's are; a view at an odd element offset is not). nullptr (an empty tensor) passes.
void check_aligned(const char* op, std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) DMAT_CHECK(detail::aligned16(p), "{}: tensors must be 16-byte aligned ({})", op, p);
}

// ---- compression ------------------------------------------------------------------------------------

// U[r, j·D + e] = bf16(x[b, c·d + j, hk, e] + pos[j, e]), r = (b·Nc + c)·Hkv + hk; 8 values per thread.
__global__ void __launch_bounds__(kThreads) nsa_gather_kernel(nv_bf16* u, const nv_bf16* x, const nv_bf16* pos,
                                                              int64_t R, int64_t Nc, int64_t Hkv, int64_t T,
                                                              int64_t l, int64_t d, int64_t D) {
  const int64_t per_row = l * D / 8, total = R * per_row;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total;
       id += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = id / per_row, k = (id - r * per_row) * 8, j = k / D, e = k - j * D;
    const int64_t hk = r % Hkv, c = (r / Hkv) % Nc, b = r / (Hkv * Nc);
    float a[8], pe[8];
    load8(x + ((b * T + c * d + j) * Hkv + hk) * D + e, a);
    load8(pos + k, pe);
#pragma unroll
    for (int i = 0; i < 8; ++i) a[i] += pe[i];
    store8(u + r * l * D + k, a);
  }
}

// act = bf16(silu(hid)), silu(a) = a·σ(a).
__global__ void __launch_bounds__(kThreads) nsa_silu_kernel(nv_bf16* act, const nv_bf16* hid, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = ld(hid + i);
    st(act + i, a * sigmoid(a));
  }
}

// dhid = bf16(ds · silu'(a)), silu'(a) = σ(a)·(1 + a·(1 − σ(a))), a = hid; ds = d silu(hid) in fp32.
__global__ void __launch_bounds__(kThreads) nsa_silu_bwd_kernel(nv_bf16* dhid, const float* ds, const nv_bf16* hid,
                                                                int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float a = ld(hid + i), g = sigmoid(a);
    st(dhid + i, ds[i] * (g * (1.f + a * (1.f - g))));
  }
}

// dx[b, p, hk, e] = bf16(Σ_c dU[(b·Nc + c)·Hkv + hk, (p − c·d)·D + e]) over the blocks c covering p,
// ascending (c0 … c1); 0 for a position in no complete block. 8 values per thread.
__global__ void __launch_bounds__(kThreads) nsa_scatter_kernel(nv_bf16* dx, const float* du, int64_t B, int64_t T,
                                                               int64_t Hkv, int64_t Nc, int64_t l, int64_t d,
                                                               int64_t D) {
  const int64_t per_row = D / 8, total = B * T * Hkv * per_row;
  for (int64_t id = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; id < total;
       id += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = id / per_row, e = (id - row * per_row) * 8;  // row = (b·T + p)·Hkv + hk
    const int64_t hk = row % Hkv, p = (row / Hkv) % T, b = row / (Hkv * T);
    const int64_t c0 = p >= l ? (p - l) / d + 1 : 0, c1 = std::min(Nc - 1, p / d);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t c = c0; c <= c1; ++c) {
      float g[8];
      load8f(du + ((b * Nc + c) * Hkv + hk) * l * D + (p - c * d) * D + e, g);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += g[i];
    }
    store8(dx + row * D + e, acc);
  }
}

// partial[part, k] = Σ dU[r, k] over the part's rows [part·rpp, (part + 1)·rpp) ∩ [0, R), ascending.
__global__ void __launch_bounds__(kThreads) nsa_column_part_kernel(float* partial, const float* du, int64_t R,
                                                                   int64_t K, int64_t rpp) {
  const int64_t part = blockIdx.x, k = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const int64_t r0 = part * rpp, r1 = std::min(R, r0 + rpp);
  float s = 0.f;
  for (int64_t r = r0; r < r1; ++r) s += du[r * K + k];
  partial[part * K + k] = s;
}

void gather_blocks(bf16* u, const bf16* x, const bf16* pos, const NsaShape& s) {
  const int64_t Nc = s.n_cmp(), R = s.B * Nc * s.Hkv, work = R * s.cmp_block * s.D / 8;
  DMAT_CHECK(detail::aligned16(u) && detail::aligned16(x) && detail::aligned16(pos),
             "nsa compression: tensors must be 16-byte aligned");
  nsa_gather_kernel<<<grid_for(work, kThreads), kThreads, 0, stream()>>>(nv(u), nv(x), nv(pos), R, Nc, s.Hkv, s.T,
                                                                         s.cmp_block, s.cmp_stride, s.D);
  DMAT_CUDA_LAUNCH_CHECK();
}

// ---- backward preprocess: delta = Σ dO∘O -------------------------------------------------------------

// delta[b, h, t] = Σ_e dO·O (lanes over e, then the fixed butterfly); one warp per (b, t, h) row.
__global__ void __launch_bounds__(kThreads) nsa_delta_kernel(float* delta, const nv_bf16* out, const nv_bf16* dout,
                                                             int64_t rows, int T, int H, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (row >= rows) return;  // whole warps
  float acc = 0.f;
  for (int e = lane; e < D; e += 32) acc = fmaf(ld(out + row * D + e), ld(dout + row * D + e), acc);
  acc = detail::group_sum(acc);
  if (lane == 0) {
    const int64_t h = row % H, bt = row / H, t = bt % T, b = bt / T;
    delta[(b * H + h) * T + t] = acc;
  }
}

float* compute_delta(const bf16* out, const bf16* dout, const NsaShape& s) {
  const int64_t rows = s.B * s.T * s.H;
  float* delta = static_cast<float*>(workspace(size_t(rows) * sizeof(float)));
  nsa_delta_kernel<<<unsigned(ceil_div(rows * 32, kThreads)), kThreads, 0, stream()>>>(
      delta, nv(out), nv(dout), rows, int(s.T), int(s.H), int(s.D));
  DMAT_CUDA_LAUNCH_CHECK();
  return delta;
}

// The parameter block of both attention branches (keys [B,Tk,Hkv,D]).
NsaAttnParams attn_params(const NsaShape& s, int64_t Tk) {
  NsaAttnParams p{};
  p.T = int(s.T), p.Tk = int(Tk), p.H = int(s.H), p.Hkv = int(s.Hkv), p.group = int(s.H / s.Hkv);
  p.bq = kNsaRows / p.group;
  p.n_qt = int(ceil_div(s.T, p.bq));
  p.n_kt = int(ceil_div(Tk, kNsaKeyTile));
  p.scale = float(s.scale), p.scale_log2 = float(s.scale) * flash::kLog2e;
  p.cmp_block = int(s.cmp_block), p.cmp_stride = int(s.cmp_stride);
  p.n_sel = int(s.sel_count), p.sel_block = int(s.sel_block);
  return p;
}

// ---- selection -----------------------------------------------------------------------------------------

constexpr int kSelKeys = 32;                   // compressed keys per tile of the importance kernel
constexpr int kSelWarps = kThreads / 32;
constexpr int64_t kSelBudget = int64_t(64) << 20;  // bytes of importances per batch of queries
int64_t g_select_budget = kSelBudget;              // testing::set_nsa_select_budget

struct SelParams {
  const nv_bf16* q;
  const nv_bf16* kc;
  const float* lse;
  unsigned long long* imp;  // [B·Hkv][tb][Ns]: the batch's importances (fixed point), zeroed before
  int32_t* idx;
  int T, H, Hkv, G, D, Nc, l, d, lp, n;
  int qs, nj;   // queries per block of the importance kernel; importance slots per key tile
  int64_t Ns;   // selection blocks of the sequence
  int tb0, tb;  // this batch: queries tb0 … tb0 + tb − 1 of every (b, KV head)
  int64_t batch_rows;  // B·Hkv·tb: the batch's (b, KV head, query) rows
  double scale;
};

__device__ __forceinline__ int cmp_visible(const SelParams& p, int t) {
  return t + 1 >= p.l ? min(p.Nc, (t + 1 - p.l) / p.d + 1) : 0;
}

// Importances of the batch's queries. Block (query tile of qs queries, KV head, batch): rows are the
// tile's (query, head) pairs (head fastest), q in fp32 in shared memory (exact copies of the bf16);
// key tiles of kSelKeys compressed keys. Lane c of a warp scores key c0 + c against the warp's rows:
// an fp64 dot product (the products of bf16 values are exact), p = exp(scale·dot − lse) in fp64, its
// fixed-point value (llround(p·2^40), std::llround's rounding) times the overlap added to the
// (query, block) slot by a shared-memory integer atomic (exact, so any order gives the same sum).
// After each key tile the slots are added to the batch's rows in global memory (by this block only:
// plain adds).
__global__ void __launch_bounds__(kThreads) nsa_importance_kernel(const SelParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int rows = p.qs * p.G, kcw = p.D + 1;  // kc rows padded by one float: conflict-free lanes
  unsigned long long* simp = reinterpret_cast<unsigned long long*>(smem_raw);  // [qs][nj]
  double* slse = reinterpret_cast<double*>(simp + p.qs * p.nj);                // [rows]
  float* sq = reinterpret_cast<float*>(slse + rows);                           // [rows][D]
  float* skc = sq + rows * p.D;                                                // [kSelKeys][D + 1]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int hk = blockIdx.y, b = blockIdx.z, tq0 = p.tb0 + int(blockIdx.x) * p.qs;
  const int t_last = min(min(p.T, p.tb0 + p.tb), tq0 + p.qs) - 1;
  const int per_sel = p.lp / p.d, per_cmp = p.l / p.d;

  for (int i = tid; i < rows * p.D; i += kThreads) {
    const int r = i / p.D, e = i - r * p.D, t = tq0 + r / p.G, h = hk * p.G + r % p.G;
    sq[i] = t <= t_last ? __bfloat162float(p.q[((int64_t(b) * p.T + t) * p.H + h) * p.D + e]) : 0.f;
  }
  for (int r = tid; r < rows; r += kThreads) {
    const int t = tq0 + r / p.G, h = hk * p.G + r % p.G;
    slse[r] = t <= t_last ? double(p.lse[(int64_t(b) * p.H + h) * p.T + t]) : 0.0;
  }
  const int nv_last = t_last >= tq0 ? cmp_visible(p, t_last) : 0;
  for (int c0 = 0; c0 < nv_last; c0 += kSelKeys) {
    __syncthreads();  // q and lse are in; the previous tile's flush is done with simp and skc
    for (int i = tid; i < kSelKeys * p.D; i += kThreads) {
      const int c = i / p.D, e = i - c * p.D;
      skc[c * kcw + e] =
          c0 + c < p.Nc ? __bfloat162float(p.kc[((int64_t(b) * p.Nc + c0 + c) * p.Hkv + hk) * p.D + e]) : 0.f;
    }
    for (int i = tid; i < p.qs * p.nj; i += kThreads) simp[i] = 0ull;
    __syncthreads();
    const int c = c0 + lane, jbase = c0 / per_sel;
    for (int r = warp; r < rows; r += kSelWarps) {
      const int qi = r / p.G, t = tq0 + qi;
      if (t > t_last || c >= cmp_visible(p, t)) continue;
      const float* qr = sq + r * p.D;
      const float* kr = skc + lane * kcw;
      double acc = 0.0;
      for (int e = 0; e < p.D; ++e) acc = fma(double(qr[e]), double(kr[e]), acc);
      const double pr = exp(p.scale * acc - slse[r]);
      if (isnan(pr)) continue;  // nsa.h: adds nothing
      const long long fx = llround(pr * 0x1p40);
      const int J = t / p.lp, jhi = min(J, (c + per_cmp - 1) / per_sel);
      for (int j = c / per_sel; j <= jhi; ++j) {
        const int ov = min(c + per_cmp, (j + 1) * per_sel) - max(c, j * per_sel);
        atomicAdd(simp + qi * p.nj + (j - jbase), static_cast<unsigned long long>(ov * fx));
      }
    }
    __syncthreads();
    for (int i = tid; i < p.qs * p.nj; i += kThreads) {
      const int qi = i / p.nj, j = jbase + (i - qi * p.nj), t = tq0 + qi;
      if (t <= t_last && j <= t / p.lp && simp[i] != 0ull)
        p.imp[((int64_t(b) * p.Hkv + hk) * p.tb + (t - p.tb0)) * p.Ns + j] += simp[i];
    }
  }
}

// One warp per query of the batch: block 0, J − 1 and J (forced, within 0 … J), then the best
// candidates 1 … J − 2 by importance, descending, ties to the lower index (repeated warp argmax;
// a taken slot is marked −1), until min(J + 1, n) blocks; written ascending, −1 after.
__global__ void __launch_bounds__(kThreads) nsa_topk_kernel(const SelParams p) {
  __shared__ int chosen[kSelWarps][kNsaMaxSelCount];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t x = int64_t(blockIdx.x) * kSelWarps + warp;  // = (b·Hkv + hk)·tb + (t − tb0)
  if (x >= p.batch_rows) return;
  const int64_t row = x / p.tb;
  const int t = p.tb0 + int(x - row * p.tb);
  long long* imp = reinterpret_cast<long long*>(p.imp) + x * p.Ns;
  const int J = t / p.lp;
  int* out = chosen[warp];
  int cnt = 0;
  if (lane == 0) {
    out[cnt] = 0;
    if (J >= 1) out[cnt + 1] = J;
    if (J >= 2) out[cnt + 2] = J - 1;
  }
  cnt = min(J + 1, 3);
  const int take = min(max(0, J - 2), max(0, p.n - cnt));
  for (int k = 0; k < take; ++k) {
    long long best = -1;
    int best_j = INT_MAX;
    for (int j = 1 + lane; j <= J - 2; j += 32) {  // ascending per lane: a tie keeps the lower index
      const long long v = imp[j];
      if (v > best) best = v, best_j = j;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const long long ov = __shfl_xor_sync(0xffffffffu, best, o);
      const int oj = __shfl_xor_sync(0xffffffffu, best_j, o);
      if (ov > best || (ov == best && oj < best_j)) best = ov, best_j = oj;
    }
    // Unreachable with probabilities <= 1 (importances >= 0, and take <= the candidates): only an
    // llround overflow (p·2^40 >= 2^63, an lse inconsistent with q and kc) makes every remaining
    // importance negative. Stop rather than write imp[INT_MAX]; best_j is the same in every lane.
    if (best_j == INT_MAX) break;
    if (lane == 0) {
      imp[best_j] = -1;  // taken (importances are >= 0)
      out[cnt] = best_j;
    }
    ++cnt;
    __syncwarp();
  }
  if (lane == 0)  // insertion sort of at most n entries
    for (int i = 1; i < cnt; ++i) {
      const int v = out[i];
      int k = i - 1;
      while (k >= 0 && out[k] > v) out[k + 1] = out[k], --k;
      out[k + 1] = v;
    }
  __syncwarp();
  int32_t* dst = p.idx + (row * p.T + t) * p.n;
  for (int i = lane; i < p.n; i += 32) dst[i] = i < cnt ? out[i] : -1;
}

// ---- the selected branch's tile lists ------------------------------------------------------------------

struct ListParams {
  const int32_t* idx;
  int T, Hkv, n, lp, bq, n_qt, n_kt;
  int64_t* counts;           // count pass: key tiles per (b·Hkv + hk, query tile)
  const int64_t* start;      // fill pass: where each tile's list starts (exclusive sum of counts)
  int32_t* kt_list;          // fill pass
  unsigned long long* keys;  // fill pass, backward: (b·Hkv + hk)·n_kt + key tile per entry, or nullptr
  int32_t* vals;             // ... and the entry's query tile
};

constexpr int kListThreads = 128;

// Per (query tile, KV head, batch): the key tiles holding a key some query t of the tile keeps (a
// selected block's keys <= t), as a bitmap over the tiles up to the tile's last query in shared
// memory (integer atomics: the same bits in any order). Count pass: their number; fill pass: the
// list, ascending, at start[…] (a block-wide scan over the bitmap's words).
template <bool FILL>
__global__ void __launch_bounds__(kListThreads) nsa_tile_lists_kernel(const ListParams p) {
  using Scan = cub::BlockScan<int, kListThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  extern __shared__ uint32_t bitmap[];
  const int tid = threadIdx.x, qt = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, row = b * p.Hkv + hk;
  const int t0 = qt * p.bq, t1 = min(p.T, t0 + p.bq) - 1;
  const int nw = (t1 / kNsaKeyTile) / 32 + 1;
  for (int w = tid; w < nw; w += kListThreads) bitmap[w] = 0u;
  __syncthreads();
  for (int i = tid; i < p.bq * p.n; i += kListThreads) {
    const int t = t0 + i / p.n;
    if (t > t1) continue;
    const int j = __ldg(p.idx + (int64_t(row) * p.T + t) * p.n + i % p.n);
    if (j < 0) continue;
    const int first = j * p.lp / kNsaKeyTile, last = min((j + 1) * p.lp, t + 1) - 1;
    for (int kt = first; kt <= last / kNsaKeyTile; ++kt) atomicOr(bitmap + (kt >> 5), 1u << (kt & 31));
  }
  __syncthreads();
  const int64_t x = int64_t(row) * p.n_qt + qt;
  if constexpr (!FILL) {
    int c = 0;
    for (int w = tid; w < nw; w += kListThreads) c += __popc(bitmap[w]);
    int excl = 0, total = 0;
    Scan(scan_tmp).ExclusiveSum(c, excl, total);
    if (tid == 0) p.counts[x] = total;
  } else {
    int64_t base = p.start[x];
    for (int w0 = 0; w0 < nw; w0 += kListThreads) {
      const int w = w0 + tid;
      uint32_t word = w < nw ? bitmap[w] : 0u;
      int excl = 0, total = 0;
      Scan(scan_tmp).ExclusiveSum(__popc(word), excl, total);
      int64_t at = base + excl;
      while (word) {
        const int kt = w * 32 + __ffs(int(word)) - 1;
        word &= word - 1;
        p.kt_list[at] = kt;
        if (p.keys) {
          p.keys[at] = static_cast<unsigned long long>(row) * p.n_kt + kt;
          p.vals[at] = qt;
        }
        ++at;
      }
      base += total;
      __syncthreads();  // scan_tmp is reused
    }
  }
}

// start[x] = the first i with keys[i] >= x (keys sorted), x = 0 … nx: the transposed lists' offsets.
__global__ void __launch_bounds__(kThreads) nsa_lower_bound_kernel(int64_t* start, const unsigned long long* keys,
                                                                   int64_t P, int64_t nx) {
  const int64_t x = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x > nx) return;
  int64_t lo = 0, hi = P;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (keys[mid] < static_cast<unsigned long long>(x)) lo = mid + 1;
    else hi = mid;
  }
  start[x] = lo;
}

// The key-tile lists of every (b·Hkv + hk, query tile) of p: counts, offsets (cub's exclusive sum),
// lists. inverse: also the transposed lists (query tiles per key tile, ascending: a stable radix
// sort of the (key tile, query tile) pairs), sized exactly after one device-to-host copy of the
// total; else the lists go into worst-case room (no host synchronisation).
void build_tile_lists(NsaAttnParams& p, const int32_t* idx, const NsaShape& s, bool inverse) {
  const int64_t rows = s.B * s.Hkv, nx = rows * p.n_qt, nkx = rows * p.n_kt;
  const int64_t cap = std::min<int64_t>(p.n_kt, int64_t(p.bq) * s.sel_count * ((s.sel_block - 1) / kNsaKeyTile + 2));
  size_t scan_bytes = 0;
  DMAT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, static_cast<const int64_t*>(nullptr),
                                                static_cast<int64_t*>(nullptr), nx + 1, stream()));
  auto carve3 = [&](Carve& c) {
    int64_t* counts = c.take<int64_t>(nx + 1);
    int64_t* start = c.take<int64_t>(nx + 1);
    int64_t* qt_start = inverse ? c.take<int64_t>(nkx + 1) : nullptr;
    void* scan_tmp = c.take<char>(int64_t(scan_bytes));
    int32_t* list = inverse ? nullptr : c.take<int32_t>(nx * cap);
    return std::make_tuple(counts, start, qt_start, scan_tmp, list);
  };
  Carve sizing;
  carve3(sizing);
  Carve c3{static_cast<char*>(workspace3(sizing.off)), 0};
  auto [counts, start, qt_start, scan_tmp, list] = carve3(c3);

  ListParams lp{};
  lp.idx = idx, lp.T = p.T, lp.Hkv = p.Hkv, lp.n = p.n_sel, lp.lp = p.sel_block, lp.bq = p.bq, lp.n_qt = p.n_qt,
  lp.n_kt = p.n_kt;
  lp.counts = counts, lp.start = start;
  const dim3 grid(unsigned(p.n_qt), unsigned(s.Hkv), unsigned(s.B));
  const size_t bitmap_bytes = size_t(((s.T - 1) / kNsaKeyTile) / 32 + 1) * sizeof(uint32_t);
  flash::prepare(nsa_tile_lists_kernel<false>, bitmap_bytes);
  flash::prepare(nsa_tile_lists_kernel<true>, bitmap_bytes);
  DMAT_CUDA_CHECK(cudaMemsetAsync(counts, 0, size_t(nx + 1) * sizeof(int64_t), stream()));
  nsa_tile_lists_kernel<false><<<grid, kListThreads, bitmap_bytes, stream()>>>(lp);
  DMAT_CUDA_LAUNCH_CHECK();
  DMAT_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(scan_tmp, scan_bytes, counts, start, nx + 1, stream()));

  if (!inverse) {
    lp.kt_list = list;
    nsa_tile_lists_kernel<true><<<grid, kListThreads, bitmap_bytes, stream()>>>(lp);
    DMAT_CUDA_LAUNCH_CHECK();
    p.kt_start = start, p.kt_list = list;
    return;
  }
  int64_t P = 0;
  memcpy_d2h(&P, start + nx, sizeof(int64_t));
  const int key_bits = nkx > 1 ? 64 - __builtin_clzll(uint64_t(nkx - 1)) : 1;
  size_t sort_bytes = 0;
  DMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const unsigned long long*>(nullptr),
                                                  static_cast<unsigned long long*>(nullptr),
                                                  static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
                                                  P, 0, key_bits, stream()));
  auto carve2 = [&](Carve& c) {
    int32_t* kt_list = c.take<int32_t>(P);
    unsigned long long* keys_in = c.take<unsigned long long>(P);
    unsigned long long* keys_out = c.take<unsigned long long>(P);
    int32_t* vals_in = c.take<int32_t>(P);
    int32_t* vals_out = c.take<int32_t>(P);
    void* sort_tmp = c.take<char>(int64_t(sort_bytes));
    return std::make_tuple(kt_list, keys_in, keys_out, vals_in, vals_out, sort_tmp);
  };
  Carve sizing2;
  carve2(sizing2);
  Carve c2{static_cast<char*>(workspace2(sizing2.off)), 0};
  auto [kt_list, keys_in, keys_out, vals_in, vals_out, sort_tmp] = carve2(c2);
  lp.kt_list = kt_list, lp.keys = keys_in, lp.vals = vals_in;
  nsa_tile_lists_kernel<true><<<grid, kListThreads, bitmap_bytes, stream()>>>(lp);
  DMAT_CUDA_LAUNCH_CHECK();
  if (P > 0)
    DMAT_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys_out, vals_in, vals_out, P, 0,
                                                    key_bits, stream()));
  nsa_lower_bound_kernel<<<unsigned(ceil_div(nkx + 1, kThreads)), kThreads, 0, stream()>>>(qt_start, keys_out, P, nkx);
  DMAT_CUDA_LAUNCH_CHECK();
  p.kt_start = start, p.kt_list = kt_list, p.qt_start = qt_start, p.qt_list = vals_out;
}

// ---- gates ------------------------------------------------------------------------------------------------

// One warp per (row, head): σ of its three logits, lanes over the D values.
__global__ void __launch_bounds__(kThreads) nsa_gate_fwd_kernel(nv_bf16* out, const nv_bf16* z, const nv_bf16* oc,
                                                                const nv_bf16* os, const nv_bf16* ow, int64_t n_rh,
                                                                int D) {
  const int lane = threadIdx.x & 31;
  const int64_t rh = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;  // row·H + h
  if (rh >= n_rh) return;
  const float g0 = sigmoid(ld(z + rh * 3)), g1 = sigmoid(ld(z + rh * 3 + 1)), g2 = sigmoid(ld(z + rh * 3 + 2));
  for (int e = lane; e < D; e += 32) {
    const int64_t o = rh * D + e;
    st(out + o, g0 * ld(oc + o) + g1 * ld(os + o) + g2 * ld(ow + o));
  }
}

__global__ void __launch_bounds__(kThreads) nsa_gate_bwd_kernel(nv_bf16* dz, nv_bf16* doc, nv_bf16* dos, nv_bf16* dow,
                                                                const nv_bf16* dout, const nv_bf16* z,
                                                                const nv_bf16* oc, const nv_bf16* os,
                                                                const nv_bf16* ow, int64_t n_rh, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t rh = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (rh >= n_rh) return;
  const nv_bf16* branch[3] = {oc, os, ow};
  nv_bf16* dbranch[3] = {doc, dos, dow};
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    const float g = sigmoid(ld(z + rh * 3 + c));
    float dot = 0.f;
    for (int e = lane; e < D; e += 32) {
      const int64_t o = rh * D + e;
      const float d = ld(dout + o);
      dot = fmaf(d, ld(branch[c] + o), dot);
      st(dbranch[c] + o, g * d);
    }
    dot = detail::group_sum(dot);
    if (lane == 0) st(dz + rh * 3 + c, g * (1.f - g) * dot);
  }
}

}  // namespace

// ---- compression ------------------------------------------------------------------------------------------

void nsa_compress_forward(bf16* y, bf16* hid, const bf16* x, const bf16* pos, const bf16* w1, const bf16* w2,
                          int64_t F, const NsaShape& s) {
  check_shape(s, "nsa_compress");
  const int64_t R = s.B * s.n_cmp() * s.Hkv, K = s.cmp_block * s.D;
  if (R == 0) return;
  Carve sizing;
  sizing.take<bf16>(R * K), sizing.take<bf16>(R * F);
  Carve c{static_cast<char*>(workspace(sizing.off)), 0};
  bf16* u = c.take<bf16>(R * K);
  bf16* act = c.take<bf16>(R * F);
  gather_blocks(u, x, pos, s);
  gemm(hid, false, u, w1, R, F, K, false, true, 1.f, 0.f);  // hid = U·W1ᵀ
  nsa_silu_kernel<<<grid_for(R * F, kThreads), kThreads, 0, stream()>>>(nv(act), nv(hid), R * F);
  DMAT_CUDA_LAUNCH_CHECK();
  gemm(y, false, act, w2, R, s.D, F, false, true, 1.f, 0.f);  // y = silu(hid)·W2ᵀ
}

void nsa_compress_backward(bf16* dx, float* dpos, float* dw1, float* dw2, const bf16* dy, const bf16* hid,
                           const bf16* x, const bf16* pos, const bf16* w1, const bf16* w2, int64_t F,
                           const NsaShape& s) {
  check_shape(s, "nsa_compress_backward");
  const int64_t Nc = s.n_cmp(), R = s.B * Nc * s.Hkv, K = s.cmp_block * s.D;
  if (R == 0) {
    memset_zero(dx, size_t(s.B * s.T * s.Hkv * s.D) * sizeof(bf16));
    return;
  }
  check_aligned("nsa_compress_backward", {dx});
  const int64_t parts0 = detail::reduction_parts(R, K, K), rpp = ceil_div(R, parts0), parts = ceil_div(R, rpp);
  auto carve = [&](Carve& c) {
    bf16* act = c.take<bf16>(R * F);
    float* dsil = c.take<float>(R * F);
    bf16* dhid = c.take<bf16>(R * F);
    bf16* u = c.take<bf16>(R * K);
    float* du = c.take<float>(R * K);
    float* partial = c.take<float>(parts * K + detail::column_sum_scratch(parts, K));
    return std::make_tuple(act, dsil, dhid, u, du, partial);
  };
  Carve sizing;
  carve(sizing);
  Carve c{static_cast<char*>(workspace(sizing.off)), 0};
  auto [act, dsil, dhid, u, du, partial] = carve(c);

  nsa_silu_kernel<<<grid_for(R * F, kThreads), kThreads, 0, stream()>>>(nv(act), nv(hid), R * F);
  DMAT_CUDA_LAUNCH_CHECK();
  gemm(dw2, true, dy, act, s.D, F, R, true, false, 1.f, 1.f);  // dW2 += dyᵀ·silu(hid)
  gemm(dsil, true, dy, w2, R, F, s.D, false, false, 1.f, 0.f);  // d silu(hid) = dy·W2
  nsa_silu_bwd_kernel<<<grid_for(R * F, kThreads), kThreads, 0, stream()>>>(nv(dhid), dsil, nv(hid), R * F);
  DMAT_CUDA_LAUNCH_CHECK();
  gather_blocks(u, x, pos, s);
  gemm(dw1, true, dhid, u, F, K, R, true, false, 1.f, 1.f);  // dW1 += dhidᵀ·U
  gemm(du, true, dhid, w1, R, K, F, false, false, 1.f, 0.f);  // dU = dhid·W1
  const int64_t work = s.B * s.T * s.Hkv * s.D / 8;
  nsa_scatter_kernel<<<grid_for(work, kThreads), kThreads, 0, stream()>>>(nv(dx), du, s.B, s.T, s.Hkv, Nc,
                                                                          s.cmp_block, s.cmp_stride, s.D);
  DMAT_CUDA_LAUNCH_CHECK();
  nsa_column_part_kernel<<<dim3(unsigned(parts), unsigned(ceil_div(K, kThreads))), kThreads, 0, stream()>>>(
      partial, du, R, K, rpp);
  DMAT_CUDA_LAUNCH_CHECK();
  detail::column_sum_accumulate(dpos, partial, parts, K, partial + parts * K);
}

void nsa_compressed_rope_forward(bf16* y, const bf16* x, double theta, const NsaShape& s) {
  rope_strided_forward(y, x, s.B, s.n_cmp(), s.Hkv, s.D, theta, s.cmp_stride, s.cmp_block - 1);
}

void nsa_compressed_rope_backward(bf16* dx, const bf16* dy, double theta, const NsaShape& s) {
  rope_strided_backward(dx, dy, s.B, s.n_cmp(), s.Hkv, s.D, theta, s.cmp_stride, s.cmp_block - 1);
}

// ---- compressed attention ------------------------------------------------------------------------------

void nsa_cmp_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* kc, const bf16* vc,
                               const NsaShape& s) {
  check_shape(s, "nsa_cmp_attention");
  check_aligned("nsa_cmp_attention", {out, q, kc, vc});
  NsaAttnParams p = attn_params(s, s.n_cmp());
  p.q = nv(q), p.k = nv(kc), p.v = nv(vc), p.out = nv(out), p.lse = lse;
  nsa::launch_nsa_fwd(p, s.B, s.D, false);
}

void nsa_cmp_attention_backward(bf16* dq, bf16* dkc, bf16* dvc, const bf16* dout, const bf16* out, const float* lse,
                                const bf16* q, const bf16* kc, const bf16* vc, const NsaShape& s) {
  check_shape(s, "nsa_cmp_attention_backward");
  check_aligned("nsa_cmp_attention_backward", {dq, dkc, dvc, dout, q, kc, vc});
  NsaAttnParams p = attn_params(s, s.n_cmp());
  p.q = nv(q), p.k = nv(kc), p.v = nv(vc), p.dout = nv(dout), p.lse_in = lse;
  p.dq = nv(dq), p.dk = nv(dkc), p.dv = nv(dvc);
  p.delta = compute_delta(out, dout, s);
  nsa::launch_nsa_bwd_dq(p, s.B, s.D, false);
  nsa::launch_nsa_bwd_dkdv(p, s.B, s.D, false);
}

// ---- selection ---------------------------------------------------------------------------------------------

void nsa_select(int32_t* idx, const bf16* q, const bf16* kc, const float* lse_cmp, const NsaShape& s) {
  check_shape(s, "nsa_select");
  SelParams p{};
  p.q = nv(q), p.kc = nv(kc), p.lse = lse_cmp, p.idx = idx;
  p.T = int(s.T), p.H = int(s.H), p.Hkv = int(s.Hkv), p.G = int(s.H / s.Hkv), p.D = int(s.D);
  p.Nc = int(s.n_cmp()), p.l = int(s.cmp_block), p.d = int(s.cmp_stride), p.lp = int(s.sel_block);
  p.n = int(s.sel_count), p.Ns = s.n_sel(), p.scale = s.scale;
  p.qs = std::max(1, kNsaRows / p.G);
  const int per_sel = p.lp / p.d, per_cmp = p.l / p.d;
  p.nj = (kSelKeys + per_cmp - 2) / per_sel + 2;  // blocks one key tile can credit
  const int rows = p.qs * p.G;
  const size_t smem = size_t(p.qs * p.nj) * sizeof(unsigned long long) + size_t(rows) * sizeof(double) +
                      size_t(rows * p.D + kSelKeys * (p.D + 1)) * sizeof(float);
  flash::prepare(nsa_importance_kernel, smem);

  // queries per batch: a multiple of qs, the batch's importances within the budget (at least one tile)
  const int64_t per_query = s.B * s.Hkv * p.Ns * int64_t(sizeof(unsigned long long));
  int64_t TB = std::max<int64_t>(p.qs, g_select_budget / per_query / p.qs * p.qs);
  TB = std::min(TB, ceil_div(s.T, p.qs) * p.qs);
  auto* imp = static_cast<unsigned long long*>(workspace(size_t(TB * per_query)));
  p.imp = imp;
  for (int64_t tb0 = 0; tb0 < s.T; tb0 += TB) {
    p.tb0 = int(tb0), p.tb = int(std::min(TB, s.T - tb0)), p.batch_rows = s.B * s.Hkv * p.tb;
    DMAT_CUDA_CHECK(cudaMemsetAsync(imp, 0, size_t(p.tb) * size_t(per_query), stream()));
    const dim3 grid(unsigned(ceil_div(p.tb, p.qs)), unsigned(s.Hkv), unsigned(s.B));
    nsa_importance_kernel<<<grid, kThreads, smem, stream()>>>(p);
    DMAT_CUDA_LAUNCH_CHECK();
    nsa_topk_kernel<<<unsigned(ceil_div(p.batch_rows, kSelWarps)), kThreads, 0, stream()>>>(p);
    DMAT_CUDA_LAUNCH_CHECK();
  }
}

// ---- selected attention ----------------------------------------------------------------------------------

void nsa_slc_attention_forward(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int32_t* idx,
                               const NsaShape& s) {
  check_shape(s, "nsa_slc_attention");
  check_aligned("nsa_slc_attention", {out, q, k, v});
  NsaAttnParams p = attn_params(s, s.T);
  p.q = nv(q), p.k = nv(k), p.v = nv(v), p.out = nv(out), p.lse = lse, p.idx = idx;
  build_tile_lists(p, idx, s, false);
  nsa::launch_nsa_fwd(p, s.B, s.D, true);
}

void nsa_slc_attention_backward(bf16* dq, bf16* dk, bf16* dv, const bf16* dout, const bf16* out, const float* lse,
                                const bf16* q, const bf16* k, const bf16* v, const int32_t* idx, const NsaShape& s) {
  check_shape(s, "nsa_slc_attention_backward");
  check_aligned("nsa_slc_attention_backward", {dq, dk, dv, dout, q, k, v});
  NsaAttnParams p = attn_params(s, s.T);
  p.q = nv(q), p.k = nv(k), p.v = nv(v), p.dout = nv(dout), p.lse_in = lse, p.idx = idx;
  p.dq = nv(dq), p.dk = nv(dk), p.dv = nv(dv);
  p.delta = compute_delta(out, dout, s);
  build_tile_lists(p, idx, s, true);
  nsa::launch_nsa_bwd_dq(p, s.B, s.D, true);
  nsa::launch_nsa_bwd_dkdv(p, s.B, s.D, true);
}

// ---- gates ------------------------------------------------------------------------------------------------

void nsa_gate_forward(bf16* out, const bf16* z, const bf16* o_cmp, const bf16* o_slc, const bf16* o_win, int64_t rows,
                      int64_t H, int64_t D) {
  const int64_t n_rh = rows * H;
  if (n_rh == 0) return;
  nsa_gate_fwd_kernel<<<unsigned(ceil_div(n_rh * 32, kThreads)), kThreads, 0, stream()>>>(
      nv(out), nv(z), nv(o_cmp), nv(o_slc), nv(o_win), n_rh, int(D));
  DMAT_CUDA_LAUNCH_CHECK();
}

void nsa_gate_backward(bf16* dz, bf16* do_cmp, bf16* do_slc, bf16* do_win, const bf16* dout, const bf16* z,
                       const bf16* o_cmp, const bf16* o_slc, const bf16* o_win, int64_t rows, int64_t H, int64_t D) {
  const int64_t n_rh = rows * H;
  if (n_rh == 0) return;
  nsa_gate_bwd_kernel<<<unsigned(ceil_div(n_rh * 32, kThreads)), kThreads, 0, stream()>>>(
      nv(dz), nv(do_cmp), nv(do_slc), nv(do_win), nv(dout), nv(z), nv(o_cmp), nv(o_slc), nv(o_win), n_rh, int(D));
  DMAT_CUDA_LAUNCH_CHECK();
}

}  // namespace dmat::cuda

namespace dmat::cuda::testing {

int64_t set_nsa_select_budget(int64_t bytes) {
  const int64_t old = g_select_budget;
  g_select_budget = bytes > 0 ? bytes : kSelBudget;
  return old;
}

}  // namespace dmat::cuda::testing
