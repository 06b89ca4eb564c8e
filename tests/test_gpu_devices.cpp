// GPU plumbing (ctest label gpu): the CUDA runtime is linked and sees the device. Skipped with a
// message where no GPU is visible; the CUDA op tests of the backend join this label.
#include <gtest/gtest.h>

#include "kernels/cuda/device_info.h"

namespace dmat {
namespace {

TEST(GpuDevices, RuntimeSeesTheDevice) {
  const int n = cuda::device_count();
  if (n == 0) GTEST_SKIP() << "no CUDA device visible (or built with DMAT_CUDA=OFF)";
  for (int i = 0; i < n; ++i) {
    const std::string s = cuda::device_summary(i);
    EXPECT_NE(s.find("sm_"), std::string::npos) << s;
    std::cout << "cuda:" << i << " " << s << "\n";
  }
}

}  // namespace
}  // namespace dmat
