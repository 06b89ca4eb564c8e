// device_info.h for builds without the CUDA backend (DMAT_CUDA=OFF): no devices.
#include "kernels/cuda/device_info.h"

namespace dmat::cuda {

int device_count() { return 0; }
std::string device_summary(int id) { return "device " + std::to_string(id) + ": this build has no CUDA backend"; }

}  // namespace dmat::cuda

namespace dmat::cuda {

bool cuda_built() { return false; }
double peak_bf16_flops(int) { return 0.0; }

}  // namespace dmat::cuda
