// Checks shared by the model-level suites of every attention variant (test_model, test_mla,
// test_nsa_model). Header-only: test_util.cpp, compiled into every suite, stays free of the model.
#pragma once
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "model/model.h"

namespace dmat::test {

// Activation recomputation changes memory, not arithmetic: a model built with recompute gives, on
// the batch x → y of B sequences of T tokens, the loss and every gradient of the stored-activation
// model bit for bit (both initialised from seed 5).
inline void expect_recomputation_bit_identical(const ModelConfig& m, const std::vector<int32_t>& x,
                                               const std::vector<int32_t>& y, int64_t B, int64_t T) {
  Model a(m), r(m, DType::F32, Device::CPU, /*recompute=*/true);
  a.init_weights(5);
  r.init_weights(5);
  const double scale = 1.0 / double(B * T);
  const double la = a.forward(x.data(), y.data(), B, T, scale);
  a.backward();
  const double lr = r.forward(x.data(), y.data(), B, T, scale);
  r.backward();
  EXPECT_EQ(la, lr);
  const Tensor ga = a.grads().flat(), gr = r.grads().flat();
  ASSERT_EQ(ga.bytes(), gr.bytes());
  EXPECT_EQ(0, std::memcmp(ga.data, gr.data, ga.bytes()));
}

}  // namespace dmat::test
