// Benchmarks of the dense CUDA kernels (see ops_bench.h for what is printed and how it is counted).
#include "bench/ops_bench.h"

#include "core/error.h"

#ifdef DMAT_WITH_CUDA
#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <fmt/format.h>

#include "core/rng.h"
#include "kernels/cuda/context.h"
#include "kernels/cuda/cuda_ops.h"
#include "kernels/cuda/device_info.h"
#endif

namespace dmat {

#ifndef DMAT_WITH_CUDA

void bench_ops(std::ostream&) { fail("bench ops: this build has no CUDA backend (configure with DMAT_CUDA=ON)"); }

#else

namespace {

// Median milliseconds of `iters` timed runs after `warmup` untimed ones, each bracketed by events
// on the compute stream.
double time_ms(const std::function<void()>& f, int warmup = 3, int iters = 11) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<cudaEvent_t> ev(size_t(2 * iters));
  for (auto& e : ev) DMAT_CUDA_CHECK(cudaEventCreate(&e));
  for (int i = 0; i < iters; ++i) {
    DMAT_CUDA_CHECK(cudaEventRecord(ev[size_t(2 * i)], cuda::stream()));
    f();
    DMAT_CUDA_CHECK(cudaEventRecord(ev[size_t(2 * i + 1)], cuda::stream()));
  }
  DMAT_CUDA_CHECK(cudaEventSynchronize(ev.back()));
  std::vector<double> ms(static_cast<size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    float t = 0;
    DMAT_CUDA_CHECK(cudaEventElapsedTime(&t, ev[size_t(2 * i)], ev[size_t(2 * i + 1)]));
    ms[size_t(i)] = t;
  }
  for (auto& e : ev) DMAT_CUDA_CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// A device buffer for the duration of the benchmark.
struct Buf {
  void* p = nullptr;
  explicit Buf(size_t bytes) : p(cuda::device_alloc(bytes)) {}
  ~Buf() { cuda::device_free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  bf16* h() const { return static_cast<bf16*>(p); }
  float* f() const { return static_cast<float*>(p); }
};

void gemm_line(std::ostream& out, const std::string& name, const std::string& form, int64_t M, int64_t N,
               int64_t K, bool ta, bool tb, bool c_f32, float beta, const bf16* A, const bf16* B, void* C,
               const char* anchor = nullptr) {
  const double ms = time_ms([&] { cuda::gemm(C, c_f32, A, B, M, N, K, ta, tb, 1.f, beta); });
  const double tflops = 2.0 * double(M) * double(N) * double(K) / (ms * 1e-3) / 1e12;
  out << fmt::format(R"({{"bench":"ops","op":"gemm","name":"{}","form":"{}","M":{},"N":{},"K":{},"trans_a":{},)"
                     R"("trans_b":{},"c":"{}","beta":{},"ms":{:.4f},"tflops":{:.1f}{}}})",
                     name, form, M, N, K, ta, tb, c_f32 ? "fp32" : "bf16", beta, ms, tflops,
                     anchor ? std::string(",") + anchor : "")
      << "\n"
      << std::flush;
}

void bw_line(std::ostream& out, const std::string& op, const std::string& shape, double bytes,
             const std::function<void()>& f, const char* anchor = nullptr) {
  const double ms = time_ms(f);
  out << fmt::format(R"({{"bench":"ops","op":"{}","shape":"{}","bytes":{:.0f},"ms":{:.4f},"GB/s":{:.0f}{}}})", op,
                     shape, bytes, ms, bytes / (ms * 1e-3) / 1e9, anchor ? std::string(",") + anchor : "")
      << "\n"
      << std::flush;
}

}  // namespace

void bench_ops(std::ostream& out) {
  if (cuda::device_count() == 0) fail("bench ops: no CUDA device visible");
  out << fmt::format(R"({{"bench":"ops","device":"{}","gemm_flops":"2*M*N*K","bandwidth_bytes":"minimum read + write"}})",
                     cuda::device_summary(0))
      << "\n";

  // ---- GEMM ----
  {
    const int64_t S = 8192;
    Buf a(size_t(S * S) * 2), b(size_t(S * S) * 2), c(size_t(S * S) * 2);
    cuda::fill_bf16(a.h(), S * S, 0.01f);
    cuda::fill_bf16(b.h(), S * S, 0.02f);
    gemm_line(out, "square", "NN", S, S, S, false, false, false, 0.f, a.h(), b.h(), c.p,
              R"("anchor_pytorch_tflops":773)");
  }
  const int64_t M = 65536, d = 768, ffn = 2304, V = 32768, H = 6, Hkv = 3, Dh = 128;
  {
    // The model's GEMMs as it runs them today (one per projection; the LM head per chunk of 4096 rows
    // = 2^27 logits, Model::head_chunk_rows) and as they could be fused (q/k/v, gate/up, bigger chunks).
    struct Lin {
      const char* name;
      int64_t in, out, rows;
    };
    const Lin lins[] = {{"q", d, H * Dh, M},
                        {"k_or_v", d, Hkv * Dh, M},
                        {"qkv", d, (H + 2 * Hkv) * Dh, M},
                        {"attn_out", H * Dh, d, M},
                        {"ffn_gate_or_up", d, ffn, M},
                        {"ffn_gate_up", d, 2 * ffn, M},
                        {"ffn_down", ffn, d, M},
                        {"lm_head_chunk4096", d, V, 4096},
                        {"lm_head_chunk8192", d, V, 8192},
                        {"lm_head_chunk16384", d, V, 16384}};
    int64_t max_io = 0, max_w = 0;
    for (const Lin& l : lins)
      max_io = std::max({max_io, l.rows * l.in, l.rows * l.out}), max_w = std::max(max_w, l.in * l.out);
    Buf x(size_t(max_io) * 2), y(size_t(max_io) * 2), w(size_t(max_w) * 2), dw(size_t(max_w) * 4);
    cuda::fill_bf16(x.h(), max_io, 0.01f);
    cuda::fill_bf16(y.h(), max_io, 0.01f);
    cuda::fill_bf16(w.h(), max_w, 0.01f);
    cuda::fill_f32(dw.f(), max_w, 0.f);
    for (const Lin& l : lins) {
      // y[M,out] = x[M,in] · W[out,in]^T;  dx[M,in] = dy · W;  dW[out,in] += dy^T · x (fp32, beta 1).
      gemm_line(out, l.name, "fwd", l.rows, l.out, l.in, false, true, false, 0.f, x.h(), w.h(), y.p);
      gemm_line(out, l.name, "bwd_dx", l.rows, l.in, l.out, false, false, false, 0.f, y.h(), w.h(), x.p);
      gemm_line(out, l.name, "bwd_dw", l.out, l.in, l.rows, true, false, true, 1.f, y.h(), x.h(), dw.p);
    }
  }

  // ---- copy and memory-bound kernels ----
  const int64_t nd = M * d, nf = M * ffn;
  Buf a(size_t(nf) * 2), b(size_t(nf) * 2), c(size_t(nf) * 2), e(size_t(nf) * 2), fa(size_t(nf) * 4),
      fb(size_t(nf) * 4);
  cuda::fill_bf16(a.h(), nf, 0.5f);
  cuda::fill_bf16(b.h(), nf, -0.25f);
  cuda::fill_bf16(c.h(), nf, 0.125f);
  cuda::fill_f32(fa.f(), nf, 0.5f);
  cuda::fill_f32(fb.f(), nf, 0.25f);
  const std::string sd = fmt::format("{}x{}", M, d), sf = fmt::format("{}x{}", M, ffn);
  const double B2 = 2, B4 = 4;
  bw_line(out, "copy", fmt::format("{} bytes", nf * 4), 2.0 * double(nf) * 4,
          [&] { cuda::memcpy_d2d(fb.p, fa.p, size_t(nf) * 4); }, R"("anchor_pytorch_GB/s":4180)");
  bw_line(out, "fill_bf16", sf, double(nf) * B2, [&] { cuda::fill_bf16(e.h(), nf, 1.f); });
  bw_line(out, "fill_f32", sf, double(nf) * B4, [&] { cuda::fill_f32(fb.f(), nf, 1.f); });
  bw_line(out, "f32_to_bf16", sf, double(nf) * (B4 + B2), [&] { cuda::f32_to_bf16(e.h(), fa.f(), nf); });
  bw_line(out, "bf16_to_f32", sf, double(nf) * (B4 + B2), [&] { cuda::bf16_to_f32(fb.f(), a.h(), nf); });
  bw_line(out, "add_inplace_f32", sf, double(nf) * 3 * B4, [&] { cuda::add_inplace_f32(fb.f(), fa.f(), nf); });
  bw_line(out, "add_inplace_bf16", sf, double(nf) * 3 * B2, [&] { cuda::add_inplace_bf16(e.h(), a.h(), nf); });
  bw_line(out, "scale_inplace_f32", sf, double(nf) * 2 * B4, [&] { cuda::scale_inplace_f32(fb.f(), nf, 1.f); });
  bw_line(out, "swiglu_forward", sf, double(nf) * 3 * B2, [&] { cuda::swiglu_forward(e.h(), a.h(), b.h(), nf); });
  cuda::fill_bf16(e.h(), nf, 0.1f);
  // swiglu_backward writes dg, du over copies it does not read again (a, b hold g, u).
  Buf dg(size_t(nf) * 2), du(size_t(nf) * 2);
  bw_line(out, "swiglu_backward", sf, double(nf) * 5 * B2,
          [&] { cuda::swiglu_backward(dg.h(), du.h(), e.h(), a.h(), b.h(), nf); });
  Buf r(size_t(d) * 2), w(size_t(d) * 2), rs(size_t(M * H) * 4), dr(size_t(d) * 4);
  cuda::fill_bf16(r.h(), d, 1.f);
  cuda::fill_bf16(w.h(), d, 1.f);
  cuda::fill_f32(dr.f(), d, 0.f);
  bw_line(out, "residual_forward", sd, double(nd) * 3 * B2,
          [&] { cuda::residual_forward(e.h(), a.h(), r.h(), b.h(), M, d); });
  bw_line(out, "residual_backward(dx,dr)", sd, double(nd) * 3 * B2,
          [&] { cuda::residual_backward(e.h(), dr.f(), b.h(), a.h(), r.h(), M, d); });
  bw_line(out, "rmsnorm_forward", sd, double(nd) * 2 * B2,
          [&] { cuda::rmsnorm_forward(e.h(), rs.f(), a.h(), w.h(), M, d, 1e-6f); });
  bw_line(out, "residual_rmsnorm_forward", sd, double(nd) * 4 * B2,
          [&] { cuda::residual_rmsnorm_forward(c.h(), e.h(), rs.f(), c.h(), r.h(), b.h(), w.h(), M, d, 1e-6f); });
  cuda::fill_bf16(c.h(), nf, 0.125f);
  bw_line(out, "rmsnorm_backward(dx,dw)", sd, double(nd) * 3 * B2,
          [&] { cuda::rmsnorm_backward(e.h(), dr.f(), b.h(), a.h(), w.h(), rs.f(), M, d, false); });
  const std::string sq = fmt::format("{}x{} (QK-norm)", M * H, Dh);
  bw_line(out, "rmsnorm_forward", sq, double(M * H * Dh) * 2 * B2,
          [&] { cuda::rmsnorm_forward(e.h(), rs.f(), a.h(), w.h(), M * H, Dh, 1e-6f); });
  bw_line(out, "rmsnorm_backward(dx,dw)", sq, double(M * H * Dh) * 3 * B2,
          [&] { cuda::rmsnorm_backward(e.h(), dr.f(), b.h(), a.h(), w.h(), rs.f(), M * H, Dh, false); });
  const int64_t Bt = 32, T = M / 32;
  const std::string srope = fmt::format("B={} T={} H={} Dh={}", Bt, T, H, Dh);
  bw_line(out, "rope_forward", srope, double(M * H * Dh) * 2 * B2,
          [&] { cuda::rope_forward(e.h(), a.h(), Bt, T, H, Dh, 10000.0); });
  bw_line(out, "rope_backward", srope, double(M * H * Dh) * 2 * B2,
          [&] { cuda::rope_backward(e.h(), a.h(), Bt, T, H, Dh, 10000.0); });

  // Embedding: random tokens; forward reads n rows of the table and writes n rows.
  {
    std::vector<int32_t> tok(static_cast<size_t>(M));
    Rng rng(1234);
    for (auto& t : tok) t = int32_t(rng.below(uint64_t(V)));
    Buf td(size_t(M) * 4), table(size_t(V * d) * 2), dtable(size_t(V * d) * 4);
    cuda::memcpy_h2d(td.p, tok.data(), tok.size() * 4);
    cuda::fill_bf16(table.h(), V * d, 0.01f);
    cuda::fill_f32(dtable.f(), V * d, 0.f);
    const std::string se = fmt::format("n={} D={} V={}", M, d, V);
    bw_line(out, "embedding_forward", se, double(nd) * 2 * B2,
            [&] { cuda::embedding_forward(e.h(), table.h(), static_cast<int32_t*>(td.p), M, d); });
    // Reads dout once, read-modify-writes the touched fp32 rows (≤ V).
    bw_line(out, "embedding_backward", se, double(nd) * B2 + 2.0 * double(std::min(M, V) * d) * B4,
            [&] { cuda::embedding_backward(dtable.f(), a.h(), static_cast<int32_t*>(td.p), M, d, V); });
  }
  // Softmax cross-entropy over the full logits (in place), as an unchunked LM head would.
  {
    const int64_t rows = 16384;
    std::vector<int32_t> tg(static_cast<size_t>(rows));
    Rng rng(99);
    for (auto& t : tg) t = int32_t(rng.below(uint64_t(V)));
    Buf logits(size_t(rows * V) * 2), td(size_t(rows) * 4), loss(size_t(rows) * 4);
    cuda::memcpy_h2d(td.p, tg.data(), tg.size() * 4);
    cuda::fill_bf16(logits.h(), rows * V, 0.01f);
    bw_line(out, "softmax_xent(in place)", fmt::format("{}x{}", rows, V), double(rows * V) * 2 * B2, [&] {
      cuda::softmax_xent(loss.f(), logits.h(), logits.h(), static_cast<int32_t*>(td.p), rows, V, 1.f / float(rows));
    });
  }
  // AdamW over ~the paper-80M parameter count in 100 segments; sum of squares over the gradients.
  {
    const int64_t P = 80'000'000, nseg = 100;
    std::vector<cuda::AdamSegment> segs;
    for (int64_t s = 0; s < nseg; ++s) segs.push_back({s * (P / nseg), P / nseg, s % 2 ? 0.1f : 0.f});
    Buf master(size_t(P) * 4), g(size_t(P) * 4), m(size_t(P) * 4), v(size_t(P) * 4), p(size_t(P) * 2),
        out_d(8);
    for (Buf* x : {&master, &g, &m, &v}) cuda::fill_f32(x->f(), P, 0.01f);
    bw_line(out, "adamw_step", fmt::format("{} params", P), double(P) * (4 * 4 + 3 * 4 + 2), [&] {
      cuda::adamw_step(master.f(), p.h(), g.f(), m.f(), v.f(), segs.data(), int(nseg), 1e-3f, 0.9f, 0.95f, 1e-8f,
                       0.1f, 0.05f, 1.f);
    });
    bw_line(out, "sum_squares_f32", fmt::format("{}", P), double(P) * 4,
            [&] { cuda::sum_squares_f32(static_cast<double*>(out_d.p), g.f(), P); });
  }
  cuda::synchronize();
}

#endif

}  // namespace dmat
