// The Python module fastnn._C. Importing it registers every op (TORCH_LIBRARY_FRAGMENT blocks in
// the family sources) and exposes what was built, for fastnn/_extension.py.
#include <torch/extension.h>

#include "module.h"

namespace fastnn {
namespace {

bool built_with_cuda() {
#ifdef FASTNN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastnn compiled kernels (CPU, and CUDA when built with it)";
  m.def("built_with_cuda", &fastnn::built_with_cuda,
        "whether the CUDA kernels were compiled into this library");
  m.def("torch_version",
        []() { return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR); },
        "the torch version this library was compiled against");
  fastnn::bind_optim(m);
}
