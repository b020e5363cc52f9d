// Shared helpers for fastnn's host code: argument checks that name the argument, and the
// dtype dispatch every kernel family uses.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastnn {

// Raise a ValueError-like error that names the argument, what was expected and what arrived.
#define FASTNN_CHECK_ARG(cond, arg, expected, received)                                   \
  TORCH_CHECK_VALUE(cond, "fastnn: argument '", arg, "': expected ", expected, ", got ", \
                    received)

inline std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "an undefined tensor";
  std::string s = "tensor of shape [";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  s += "], dtype " + std::string(c10::toString(t.scalar_type())) + ", device " +
       t.device().str();
  return s;
}

// A CPU kernel reads its tensors' memory: every tensor argument must be a CPU tensor (one on the
// meta device, or on a GPU, can reach a CPU registration when the other arguments are CPU tensors).
inline void check_cpu(std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  for (const auto& a : args)
    if (a.second->defined())
      FASTNN_CHECK_ARG(a.second->device().is_cpu(), a.first, "a CPU tensor", describe(*a.second));
}

}  // namespace fastnn
