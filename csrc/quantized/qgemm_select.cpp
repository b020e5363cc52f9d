// The int8 kernel variant in use: that of the CPU instruction-set level in use (cpu_isa.h), which
// is FASTNN_CPU_ISA when first asked, else the best this CPU runs. set_kernels() changes the level,
// so the fp32 kernels follow too (quantized_set_isa, the tests). An unknown name raises a torch
// ValueError that lists the levels this CPU runs.
#include "cpu_isa.h"
#include "quantized/qgemm.h"

namespace fastnn {
namespace quantized {

const Kernels& active_kernels() { return *cpu_isa::active_level().int8; }

const Kernels& set_kernels(const char* name) { return *cpu_isa::set_level(name).int8; }

}  // namespace quantized
}  // namespace fastnn
