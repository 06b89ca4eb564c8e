#include "core/kernel_options.h"

#include <cmath>
#include <cstdlib>

#include "core/error.h"

namespace dmat {

namespace {

template <class E>
std::string name_of(E v, std::initializer_list<const char*> names) {
  return *(names.begin() + int(v));
}
int index_of(const std::string& text, const std::vector<std::string>& choices) {
  for (size_t i = 0; i < choices.size(); ++i)
    if (choices[i] == text) return int(i);
  return -1;
}

const std::vector<std::string> kOrders = {"lpt", "launch", "lpt1", "lpt2", "lpt4", "lpt8", "lpt16", "lpt32", "lpt64"};

}  // namespace

const std::vector<KernelKnob>& kernel_knobs() {
  static const std::vector<KernelKnob> knobs = {
      {"attn_path", "DMAT_ATTN_PATH", {"auto", "mma", "wgmma"},
       [](const KernelOptions& o) { return name_of(o.attn_path, {"auto", "mma", "wgmma"}); },
       [](KernelOptions& o, const std::string& t) { o.attn_path = AttnPathOption(index_of(t, {"auto", "mma", "wgmma"})); }},
      {"attn_order", "DMAT_ATTN_ORDER", kOrders,
       [](const KernelOptions& o) {
         return o.attn_order < 0 ? std::string("lpt") : o.attn_order == 0 ? std::string("launch") : "lpt" + std::to_string(o.attn_order);
       },
       [](KernelOptions& o, const std::string& t) {
         o.attn_order = t == "lpt" ? -1 : t == "launch" ? 0 : std::stoi(t.substr(3));
       }},
      {"attn_side_stream", "DMAT_ATTN_SIDE_STREAM", {"0", "1", "2"},
       [](const KernelOptions& o) { return std::to_string(o.attn_side_stream); },
       [](KernelOptions& o, const std::string& t) { o.attn_side_stream = std::stoi(t); }},
      {"attn_wg_overlap", "DMAT_ATTN_WG_OVERLAP", {"0", "1"},
       [](const KernelOptions& o) { return std::string(o.attn_wg_overlap ? "1" : "0"); },
       [](KernelOptions& o, const std::string& t) { o.attn_wg_overlap = t == "1"; }},
      {"attn_wg_tma", "DMAT_ATTN_WG_TMA", {"0", "1"},
       [](const KernelOptions& o) { return std::string(o.attn_wg_tma ? "1" : "0"); },
       [](KernelOptions& o, const std::string& t) { o.attn_wg_tma = t == "1"; }},
      {"dma_dense", "DMAT_DMA_DENSE", {"auto", "0", "1"},
       [](const KernelOptions& o) { return name_of(o.dma_dense, {"auto", "0", "1"}); },
       [](KernelOptions& o, const std::string& t) { o.dma_dense = DmaDenseOption(index_of(t, {"auto", "0", "1"})); }},
      {"dma_thresholds", "DMAT_DMA_THRESHOLDS", {"bounds", "walk", "serial"},
       [](const KernelOptions& o) { return name_of(o.dma_thresholds, {"bounds", "walk", "serial"}); },
       [](KernelOptions& o, const std::string& t) {
         o.dma_thresholds = DmaThresholdOption(index_of(t, {"bounds", "walk", "serial"}));
       }},
      {"dma_thr_seg", "DMAT_DMA_THR_SEG", {"256", "512", "128"},
       [](const KernelOptions& o) { return std::to_string(o.dma_thr_seg); },
       [](KernelOptions& o, const std::string& t) { o.dma_thr_seg = std::stoi(t); }},
      {"gemm_algo", "DMAT_GEMM_ALGO", {"heuristic", "tuned"},
       [](const KernelOptions& o) { return std::string(o.gemm_tuned ? "tuned" : "heuristic"); },
       [](KernelOptions& o, const std::string& t) { o.gemm_tuned = t == "tuned"; }},
      {"profile", "DMAT_PROFILE", {"0", "1", "gemm"},
       [](const KernelOptions& o) { return name_of(o.profile, {"0", "1", "gemm"}); },
       [](KernelOptions& o, const std::string& t) { o.profile = ProfileOption(index_of(t, {"0", "1", "gemm"})); }},
      {"peak_tflops", "DMAT_PEAK_TFLOPS", {},
       [](const KernelOptions& o) { return fmt::format("{}", o.peak_tflops); },
       [](KernelOptions& o, const std::string& t) { o.peak_tflops = std::strtod(t.c_str(), nullptr); }},
  };
  return knobs;
}

bool operator==(const KernelOptions& a, const KernelOptions& b) {
  for (const KernelKnob& k : kernel_knobs())
    if (k.get(a) != k.get(b)) return false;
  return true;
}

void set_kernel_option(KernelOptions& o, const KernelKnob& knob, const std::string& text, const std::string& where) {
  if (knob.choices.empty()) {
    char* end = nullptr;
    const double v = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != 0 || !(v >= 0) || !std::isfinite(v))
      fail("{} must be a number of TFLOP/s >= 0 (0: the device's own figure) (got '{}')", where, text);
  } else if (index_of(text, knob.choices) < 0) {
    std::string listed;
    for (const auto& c : knob.choices) listed += (listed.empty() ? "" : ", ") + c;
    fail("{} must be one of {} (got '{}')", where, listed, text);
  }
  knob.set(o, text);
}

std::vector<std::string> apply_kernel_env(KernelOptions& o) {
  std::vector<std::string> changed;
  for (const KernelKnob& k : kernel_knobs()) {
    const char* e = std::getenv(k.env);
    if (e == nullptr || *e == 0) continue;
    const std::string before = k.get(o);
    set_kernel_option(o, k, e, k.env);
    if (k.get(o) != before)
      changed.push_back(fmt::format("run.kernels.{}: {} -> {} ({})", k.key, before, k.get(o), k.env));
  }
  return changed;
}

}  // namespace dmat
