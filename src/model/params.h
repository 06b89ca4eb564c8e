// Parameter declarations: every layer declares its parameters here (name, shape, group,
// initialisation, weight decay), and the model carves one arena from the table.
#pragma once
#include <string>
#include <vector>

#include "core/arena.h"

namespace dmat {

enum class Init { Normal, Ones, Zeros, Constant };

struct ParamInfo {
  std::string name;   // Hugging Face-style name, e.g. model.layers.0.self_attn.q_proj.weight
  Shape shape;
  std::string group;  // embedding | attention | mlp | norm | residual | head
  Init init = Init::Normal;
  double std = 0.0;   // for Init::Normal; the value for Init::Constant
  bool decay = true;  // AdamW weight decay applies (never to norms, gains, residual scales)
  double lr_scale = 1.0;  // this tensor's learning rate is lr_scale × the schedule's
};

class ParamTable {
 public:
  int add(ParamInfo p) {
    int h = table_.add(p.name, p.shape);
    info_.push_back(std::move(p));
    return h;
  }
  const TensorTable& table() const { return table_; }
  const std::vector<ParamInfo>& info() const { return info_; }

 private:
  TensorTable table_;
  std::vector<ParamInfo> info_;
};

}  // namespace dmat
