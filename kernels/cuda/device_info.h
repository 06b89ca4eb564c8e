// What CUDA devices this process sees. Declared for every build; without the CUDA backend
// (DMAT_CUDA=OFF) the count is 0.
#pragma once
#include <string>

namespace dmat::cuda {

int device_count();                 // 0 when no driver / no device (never throws)
std::string device_summary(int id); // "NVIDIA H200, sm_90, 139.8 GiB, 132 SMs"
bool cuda_built();                  // whether this build has the CUDA backend
// Dense bf16 tensor-core peak in FLOP/s for MFU, from a table of known parts (H100/H200 SXM:
// 989e12, H100 PCIe: 756e12, A100: 312e12); 0 for a device not in the table, and MFU is then
// reported as unknown rather than guessed. run.kernels.peak_tflops (or DMAT_PEAK_TFLOPS) overrides it.
double peak_bf16_flops(int id);

}  // namespace dmat::cuda
