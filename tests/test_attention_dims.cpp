// The one table of CUDA attention head dims (kernels/cuda/head_dims.h) and what consults it: every
// variant's dims(), the checks a CUDA model and the trainer's pre-check make (host code: they run,
// and are tested, in a build without CUDA and on a machine without a GPU).
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <utility>

#include "config/config.h"
#include "kernels/cuda/head_dims.h"
#include "model/attention.h"
#include "model/model.h"
#include "test_util.h"
#include "train/trainer.h"

namespace dmat {
namespace {

TEST(HeadDims, TableRowsAreDistinctAndTheSwitchReachesEachOne) {
  std::set<std::pair<int, int>> seen;
  for (const cuda::HeadDims& h : cuda::kHeadDims) {
    EXPECT_TRUE(seen.insert({h.dqk, h.dv}).second) << h.dqk << "/" << h.dv << " twice";
    EXPECT_EQ(h.dqk % 8, 0) << "the kernels load 16-byte vectors";
    EXPECT_EQ(h.dv % 8, 0);
    if (h.dma) EXPECT_EQ(h.dqk, h.dv) << "the DMA kernels take one head dim";
    int got_qk = 0, got_v = 0;
    EXPECT_TRUE(cuda::head_dims_switch(h.dqk, h.dv, [&](auto qk, auto v) {
      got_qk = decltype(qk)::value;
      got_v = decltype(v)::value;
    }));
    EXPECT_EQ(got_qk, h.dqk);
    EXPECT_EQ(got_v, h.dv);
  }
  EXPECT_FALSE(cuda::head_dims_switch(48, 48, [](auto, auto) { FAIL() << "called for a pair not in the table"; }));
  EXPECT_FALSE(cuda::head_dims_switch(128, 192, [](auto, auto) { FAIL() << "d_qk and d_v swapped"; }));
  EXPECT_EQ(cuda::head_dims_list(cuda::AttnKernel::flash), "32/32, 64/64, 128/128, 192/128");
  EXPECT_EQ(cuda::head_dims_list(cuda::AttnKernel::dma), "32/32, 64/64, 128/128");
  EXPECT_EQ(cuda::head_dims_list(cuda::AttnKernel::nsa), "32/32, 64/64, 128/128");
  EXPECT_FALSE(cuda::head_dims_supported(cuda::AttnKernel::nsa, 192, 128));
  EXPECT_TRUE(cuda::head_dims_supported(cuda::AttnKernel::flash, 192, 128));
  EXPECT_FALSE(cuda::head_dims_supported(cuda::AttnKernel::dma, 192, 128));
  EXPECT_FALSE(cuda::head_dims_wgmma(32, 32));
  EXPECT_TRUE(cuda::head_dims_wgmma(192, 128));
}

Config config_with(const nlohmann::json& model) {
  nlohmann::json j = {{"model", model}, {"data", {{"train", "x"}, {"val", "y"}}}};
  return parse_config(j);
}

std::string device_error(const Config& c) {
  try {
    check_device_support(c, Device::CUDA);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(HeadDims, VariantsReportTheirCoreDims) {
  for (const char* type : {"mha", "swa", "dma", "nsa"}) {
    nlohmann::json m = {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", type}}}};
    if (std::string(type) != "mha") m["attention"]["window"] = 4;
    const AttentionDims d = make_attention(config_with(m).model)->dims();
    EXPECT_EQ(d.d_qk, 32) << type;
    EXPECT_EQ(d.d_v, 32) << type;
    EXPECT_EQ(d.rope_dim, 32) << type;
    const cuda::AttnKernel want = std::string(type) == "dma"   ? cuda::AttnKernel::dma
                                  : std::string(type) == "nsa" ? cuda::AttnKernel::nsa
                                                               : cuda::AttnKernel::flash;
    EXPECT_EQ(d.kernel, want) << type;
  }
}

// Refused before anything runs, naming the key, with or without a GPU and CUDA in the build.
TEST(HeadDims, UnsupportedHeadDimsAreRefusedNamingTheKey) {
  const Config mha = config_with({{"d_model", 96}, {"n_heads", 2}});  // head_dim 48
  EXPECT_EQ(device_error(mha).rfind("config: model.head_dim 48 has no CUDA attention kernel for attention type mha "
                                    "(supported: 32, 64, 128)",
                                    0),
            0u)
      << device_error(mha);
  check_device_support(mha, Device::CPU);  // the CPU backend runs any head dim
  // a CUDA model asks the same question when it is built (no GPU needed to be refused)
  try {
    Model m(mha.model, DType::BF16, Device::CUDA);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("model: model.head_dim 48 has no CUDA attention kernel"), std::string::npos)
        << e.what();
  }
  // DMA: its kernels have no 192/128 row, and a local window has no CUDA kernel at all
  const Config dma = config_with(
      {{"d_model", 64}, {"n_heads", 2}, {"head_dim", 192}, {"attention", {{"type", "dma"}, {"window", 4}}}});
  EXPECT_NE(device_error(dma).find("model.head_dim 192 has no CUDA attention kernel for attention type dma "
                                   "(supported: 32, 64, 128)"),
            std::string::npos)
      << device_error(dma);
  const Config local = config_with(
      {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "dma"}, {"window", 4}, {"local_window", 2}}}});
  EXPECT_NE(device_error(local).find("config: model.attention.local_window 2 is not yet verified on CUDA"),
            std::string::npos)
      << device_error(local);
  // NSA: its kernels' head dims (the square rows marked nsa) and settings (kernels/cuda/nsa_limits.h)
  const Config nsa = config_with({{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "nsa"}}}});
  EXPECT_EQ(device_error(nsa), "");
  const Config nsa48 = config_with({{"d_model", 96}, {"n_heads", 2}, {"attention", {{"type", "nsa"}}}});
  EXPECT_EQ(device_error(nsa48).rfind("config: model.head_dim 48 has no CUDA attention kernel for attention type nsa "
                                      "(supported: 32, 64, 128)",
                                      0),
            0u)
      << device_error(nsa48);
  check_device_support(nsa48, Device::CPU);
  const Config wide = config_with({{"d_model", 64},
                                   {"n_heads", 128},
                                   {"n_kv_heads", 1},
                                   {"head_dim", 32},
                                   {"attention", {{"type", "nsa"}}}});
  EXPECT_EQ(device_error(wide), "config: model.n_heads / model.n_kv_heads = 128 / 1: the NSA CUDA kernels take at "
                                "most 64 query heads per KV head; change it or run on the CPU with run.device=\"cpu\"");
  const Config many = config_with(
      {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "nsa"}, {"sel_count", 65}}}});
  EXPECT_NE(device_error(many).find("config: model.attention.sel_count 65 exceeds the NSA CUDA kernels' 64"),
            std::string::npos)
      << device_error(many);
  const Config strides = config_with(
      {{"d_model", 64}, {"n_heads", 2}, {"attention", {{"type", "nsa"}, {"cmp_block", 520}, {"cmp_stride", 8},
                                                        {"sel_block", 64}}}});
  EXPECT_NE(device_error(strides).find("model.attention.cmp_block / cmp_stride = 520 / 8"), std::string::npos)
      << device_error(strides);
}

}  // namespace
}  // namespace dmat
