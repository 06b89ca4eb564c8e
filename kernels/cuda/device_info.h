// What CUDA devices this process sees. Declared for every build; without the CUDA backend
// (DMAT_CUDA=OFF) the count is 0.
#pragma once
#include <string>

namespace dmat::cuda {

int device_count();                 // 0 when no driver / no device (never throws)
std::string device_summary(int id); // "NVIDIA H200, sm_90, 139.8 GiB, 132 SMs"

}  // namespace dmat::cuda
