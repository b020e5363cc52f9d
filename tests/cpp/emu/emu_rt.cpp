// See emu_rt.h. Compiled into every program run by scripts/emulate_x86.py.
#include "emu_rt.h"

extern "C" {
// The compiler may turn loops into calls to these even under -ffreestanding.
void* memcpy(void* d, const void* s, size_t n) {
  auto* dp = static_cast<unsigned char*>(d);
  auto* sp = static_cast<const unsigned char*>(s);
  while (n--) *dp++ = *sp++;
  return d;
}
void* memmove(void* d, const void* s, size_t n) {
  auto* dp = static_cast<unsigned char*>(d);
  auto* sp = static_cast<const unsigned char*>(s);
  if (dp < sp) return memcpy(d, s, n);
  while (n--) dp[n] = sp[n];
  return d;
}
void* memset(void* d, int c, size_t n) {
  auto* dp = static_cast<unsigned char*>(d);
  while (n--) *dp++ = static_cast<unsigned char>(c);
  return d;
}
int memcmp(const void* a, const void* b, size_t n) {
  auto* ap = static_cast<const unsigned char*>(a);
  auto* bp = static_cast<const unsigned char*>(b);
  for (; n; --n, ++ap, ++bp)
    if (*ap != *bp) return *ap < *bp ? -1 : 1;
  return 0;
}
size_t strlen(const char* s) {
  size_t n = 0;
  while (s[n]) ++n;
  return n;
}
}

namespace {

constexpr size_t kLogSize = 64 * 1024 - 8, kArenaSize = 8 << 20, kStackSize = 256 * 1024;
// At the image's first address (emu.ld): the length, then the text (scripts/emulate_x86.py reads it).
struct Log {
  uint64_t len;
  char text[kLogSize];
};
__attribute__((section(".emu_log"), used)) Log g_log = {0, {}};
alignas(64) unsigned char g_arena[kArenaSize];
size_t g_arena_used = 0;

}  // namespace

extern "C" {
alignas(64) unsigned char emu_stack[kStackSize];
using Ctor = void (*)();
extern Ctor __init_array_start[], __init_array_end[];

uint64_t emu_guest_arg = 0;

int emu_start_c(uint64_t arg) {
  emu_guest_arg = arg;
  for (Ctor* c = __init_array_start; c != __init_array_end; ++c) (*c)();
  return emu_main();
}
}

// _start: stack at the top of emu_stack (16-byte aligned before the call, as the ABI wants), the
// harness's argument (rdi at entry) passed on, then hlt with eax = the status.
asm(R"(
  .section .text.emu_start, "ax"
  .globl _start
_start:
  lea emu_stack+262144(%rip), %rsp
  call emu_start_c
1:
  hlt
  jmp 1b
  .text
)");
static_assert(kStackSize == 262144, "the _start above hard-codes the stack size");

namespace emu {

uint64_t arg() { return emu_guest_arg; }

void put(const char* s) {
  while (*s && g_log.len < kLogSize) g_log.text[g_log.len++] = *s++;
}

void put_int(int64_t v) {
  char buf[24];
  int n = 0;
  uint64_t u = v < 0 ? 0 - uint64_t(v) : uint64_t(v);
  do {
    buf[n++] = char('0' + u % 10);
    u /= 10;
  } while (u);
  if (v < 0) buf[n++] = '-';
  char out[24];
  for (int i = 0; i < n; ++i) out[i] = buf[n - 1 - i];
  out[n] = 0;
  put(out);
}

void put_hex(uint64_t v) {
  char out[19] = "0x";
  int n = 2;
  for (int shift = 60; shift >= 0; shift -= 4) {
    const int d = int(v >> shift) & 15;
    if (d || n > 2 || shift == 0) out[n++] = "0123456789abcdef"[d];
  }
  out[n] = 0;
  put(out);
}

void put_float(double v) {
  if (v != v) return put("nan");
  if (v < 0) {
    put("-");
    v = -v;
  }
  if (v > 1e18) return put("inf-or-huge");
  if (v < 1e15 && double(int64_t(v)) == v) return put_int(int64_t(v));  // integers as integers
  int exp10 = 0;
  while (v >= 10) v /= 10, ++exp10;
  while (v != 0 && v < 1) v *= 10, --exp10;
  // v in [1, 10): nine significant digits, then the exponent
  const int64_t digits = int64_t(v * 1e8 + 0.5);
  put_int(digits / 100000000);
  put(".");
  char frac[9];
  int64_t f = digits % 100000000;
  for (int i = 7; i >= 0; --i, f /= 10) frac[i] = char('0' + f % 10);
  frac[8] = 0;
  put(frac);
  put("e");
  put_int(exp10);
}

void* alloc(size_t bytes) {
  const size_t start = (g_arena_used + 63) & ~size_t(63);
  if (start + bytes > kArenaSize) {
    log("emu: arena exhausted (", int64_t(bytes), " bytes asked)\n");
    asm volatile("ud2");  // stops the run with #UD at this address
  }
  g_arena_used = start + bytes;
  return g_arena + start;
}
size_t mark() { return g_arena_used; }
void release(size_t m) { g_arena_used = m; }

Cpuid cpuid(uint32_t leaf, uint32_t subleaf) {
  Cpuid r;
  asm volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(subleaf));
  return r;
}

uint64_t xgetbv0() {
  uint32_t lo, hi;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

bool has_avx512(bool vnni) {
  const Cpuid l1 = cpuid(1), l7 = cpuid(7);
  struct Need {
    const char* name;
    bool ok;
  } needs[] = {
      {"osxsave", ((l1.ecx >> 27) & 1) != 0},
      {"avx512f", ((l7.ebx >> 16) & 1) != 0},
      {"avx512dq", ((l7.ebx >> 17) & 1) != 0},
      {"avx512bw", ((l7.ebx >> 30) & 1) != 0},
      {"avx512vl", ((l7.ebx >> 31) & 1) != 0},
      {"avx512vnni", !vnni || ((l7.ecx >> 11) & 1) != 0},
  };
  bool ok = true;
  for (const Need& n : needs)
    if (!n.ok) {
      log("emu: this CPU lacks ", n.name, "\n");
      ok = false;
    }
  if (ok && (xgetbv0() & 0xE6) != 0xE6) {
    log("emu: XCR0 ", xgetbv0(), " does not enable the AVX-512 state\n");
    ok = false;
  }
  return ok;
}

}  // namespace emu
