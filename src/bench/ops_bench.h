// `dmatrain bench ops`: the dense CUDA kernels at the paper-80M model's shapes (B·T = 65536 rows,
// d = 768, ffn 2304, vocab 32768, 6 heads of 128), timed with CUDA events (warm-up, median of 10+
// runs), one JSON line per measurement: bf16 GEMM 8192³ (anchor: PyTorch 773 TFLOP/s), the
// model's GEMMs in forward and both backward forms (TFLOP/s = 2·M·N·K / time), device copy
// (anchor 4.18 TB/s, bytes = read + write) and each memory-bound kernel's achieved GB/s (bytes =
// the minimum each kernel must read and write). Without the CUDA backend it throws dmat::Error.
#pragma once
#include <ostream>

namespace dmat {

void bench_ops(std::ostream& out);

}  // namespace dmat
