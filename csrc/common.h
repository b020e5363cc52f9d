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

}  // namespace fastnn
