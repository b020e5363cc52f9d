// Python bindings of each family, called from PYBIND11_MODULE in module.cpp. Ops themselves are
// registered with the dispatcher (TORCH_LIBRARY_FRAGMENT) in the family sources, not here;
// bindings here are only for host-side helpers that are not ops.
#pragma once

#include <torch/extension.h>

namespace fastnn {
void bind_optim(pybind11::module_& m);
}  // namespace fastnn
