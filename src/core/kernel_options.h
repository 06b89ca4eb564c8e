// Kernel tuning switches: which attention path and block order, DMA's dense/gathered choice and
// threshold scan, the GEMM algorithm choice, per-op profiling, the peak used for MFU. One typed
// struct, filled from the config's run.kernels section (config.cpp) with the DMAT_* environment
// variable of each switch as an explicit override applied once at start-up, then handed to the
// CUDA context (kernels/cuda/context.h: kernel_options). The defaults are the measured-best
// choices; every switch exists for measurements and A/B checks, none changes a result's meaning.
// Lives in core so that config and kernels both include it without depending on each other.
#pragma once
#include <string>
#include <vector>

namespace dmat {

enum class AttnPathOption { automatic, mma, wgmma };          // "auto" | "mma" | "wgmma"
enum class DmaDenseOption { automatic, never, always };        // "auto" | "0" | "1"
enum class DmaThresholdOption { bounds, walk, serial };        // "bounds" | "walk" | "serial"
enum class ProfileOption { off, ops, gemm };                   // "0" | "1" | "gemm"

struct KernelOptions {
  AttnPathOption attn_path = AttnPathOption::automatic;  // both directions; auto: per direction
  // Attention grid block order: -1 "lpt" (groups of about a wave, heaviest tiles first), 0
  // "launch" (the plain grid order), N > 0 "lptN" (groups of N (head, batch) pairs).
  int attn_order = -1;
  int attn_side_stream = 2;      // SideStream mode of composite ops: 0 none, 1 high priority, 2 same
  bool attn_wg_overlap = false;  // the software-pipelined wgmma consumers
  bool attn_wg_tma = true;       // the wgmma forward's dense K/V tiles by TMA
  DmaDenseOption dma_dense = DmaDenseOption::automatic;
  DmaThresholdOption dma_thresholds = DmaThresholdOption::bounds;
  int dma_thr_seg = 256;         // the bounds scan's segment length: 128, 256 or 512
  bool gemm_tuned = false;       // cuBLASLt: time the heuristic's candidates, keep the fastest
  ProfileOption profile = ProfileOption::off;
  double peak_tflops = 0;        // bf16 peak for MFU; 0: the device's table entry
};
// Every switch equal (defined out of line: nvcc's front end rejects a defaulted operator==).
bool operator==(const KernelOptions& a, const KernelOptions& b);

// One switch: its key under run.kernels, its environment variable, and its allowed values as text
// (empty for peak_tflops: a number >= 0). get/set convert between the struct and that text.
struct KernelKnob {
  const char* key;
  const char* env;
  std::vector<std::string> choices;
  std::string (*get)(const KernelOptions&);
  void (*set)(KernelOptions&, const std::string&);  // the text is already validated
};
const std::vector<KernelKnob>& kernel_knobs();

// Sets the knob `key` from `text`; fails naming `where` (a config path or variable) and the
// allowed values when the text is not one of them.
void set_kernel_option(KernelOptions& o, const KernelKnob& knob, const std::string& text, const std::string& where);
// Applies every DMAT_* variable that is set and non-empty; returns one line per value it changed
// ("run.kernels.attn_order: lpt -> launch (DMAT_ATTN_ORDER)").
std::vector<std::string> apply_kernel_env(KernelOptions& o);

}  // namespace dmat
