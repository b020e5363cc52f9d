// A minimal runtime for freestanding test programs run on an emulated x86-64 CPU by
// scripts/emulate_x86.py (no OS, no libc): the entry point, a log the harness prints, a bump
// allocator, CPUID, and the memcpy/memset/memmove/memcmp that compilers emit calls to.
//
// A program defines `int emu_main()` and returns its exit status (0: passed). _start sets up the
// stack, runs static constructors, calls emu_main and stops with `hlt`, leaving the status in eax.
// The log lies at the image's first address (emu.ld), where the harness reads it when the program
// stops, also on a CPU exception.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <type_traits>

int emu_main();

namespace emu {

// The number given to scripts/emulate_x86.py --guest-arg (0 by default).
uint64_t arg();

// The log: text appended here is printed by the harness when the program stops.
void put(const char* s);
void put_int(int64_t v);
void put_hex(uint64_t v);
void put_float(double v);  // nine significant digits: enough to see a one-ulp float difference
template <typename T>
void put(T v) {
  if constexpr (std::is_integral_v<T>) {
    put_int(int64_t(v));
  } else {
    put_float(double(v));
  }
}
inline void put(char* s) { put(static_cast<const char*>(s)); }
template <typename... Ts>
void log(const Ts&... parts) {
  (put(parts), ...);
}

// 64-byte-aligned memory from a fixed arena; release(mark()) frees everything allocated since.
void* alloc(size_t bytes);
size_t mark();
void release(size_t m);
template <typename T>
T* alloc_array(int64_t n) {
  return static_cast<T*>(alloc(size_t(n > 0 ? n : 1) * sizeof(T)));
}

struct Cpuid {
  uint32_t eax, ebx, ecx, edx;
};
Cpuid cpuid(uint32_t leaf, uint32_t subleaf = 0);
uint64_t xgetbv0();

// Whether the CPU reports AVX-512 F, BW, DQ and VL and the OS (here: the harness) has enabled
// their register state; with vnni, also AVX512_VNNI. Logs what is missing.
bool has_avx512(bool vnni);

}  // namespace emu
