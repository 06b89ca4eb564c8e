// main() of the gpu-label suites: the tests run as usual, and a run that passed without a visible
// CUDA device (every test skipped, or a CUDA-off build) exits kSkipExit, which ctest reports as
// "Not Run (Skipped)" (SKIP_RETURN_CODE, tests/CMakeLists.txt), never as Passed.
#include <gtest/gtest.h>

#include "kernels/cuda/device_info.h"

namespace {
constexpr int kSkipExit = 77;
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  // test discovery (--gtest_list_tests) must succeed on any machine
  if (rc == 0 && !::testing::GTEST_FLAG(list_tests) && dmat::cuda::device_count() == 0) return kSkipExit;
  return rc;
}
