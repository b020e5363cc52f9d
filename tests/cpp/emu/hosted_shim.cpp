// Lets a hosted C++ test program (one that uses std::vector, std::string, printf and <cmath>, such
// as tests/cpp/vec_test.cpp) run freestanding on the emulated CPU of scripts/emulate_x86.py, with
// emu_rt.cpp: the few C and C++ runtime functions such a program (and torch's headers) link to,
// implemented without an OS. Nothing may throw: the throw helpers stop the run (#UD) after logging.
// The math functions are accurate to a few ulp of double, far inside the tests' tolerances; they
// exist so that no glibc code (whose libm picks its variants through ifunc resolvers, which need
// glibc's start-up code) runs in the guest.
#include <stdarg.h>

#include <ios>
#include <new>

#include "emu_rt.h"

int main();
int emu_main() { return main(); }

namespace {

[[noreturn]] void die(const char* why) {
  emu::log("emu: ", why, "\n");
  asm volatile("ud2");
  __builtin_unreachable();
}

// exp for |x| < 709.8: 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2], Taylor to r^14 (error < 1e-17).
double exp_impl(double x) {
  if (x != x) return x;
  if (x > 709.78) return __builtin_inf();
  if (x < -745.2) return 0.0;
  const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  const double t = x * 1.44269504088896338700;
  const double kf = double(int64_t(t < 0 ? t - 0.5 : t + 0.5));  // nearest (|t| < 1100)
  const double r = (x - kf * ln2_hi) - kf * ln2_lo;
  double term = 1.0, sum = 1.0;
  for (int i = 1; i <= 14; ++i) {
    term *= r / i;
    sum += term;
  }
  int k = int(kf);
  // scale by 2^k in two steps so that subnormal results and k = 1024 stay representable
  const int k1 = k / 2, k2 = k - k1;
  auto pow2 = [](int e) {
    const uint64_t bits = uint64_t(e + 1023) << 52;
    double d;
    __builtin_memcpy(&d, &bits, 8);
    return d;
  };
  return sum * pow2(k1) * pow2(k2);
}

double tanh_impl(double x) {
  if (x != x) return x;
  const double a = x < 0 ? -x : x;
  if (a > 20) return x < 0 ? -1.0 : 1.0;
  double t;
  if (a < 0.5) {  // series-free form without cancellation: tanh = (e^2a - 1) / (e^2a + 1) with e^2a - 1 summed
    double term = 1.0, em1 = 0.0;
    for (int i = 1; i <= 25; ++i) {
      term *= 2 * a / i;
      em1 += term;
    }
    t = em1 / (em1 + 2.0);
  } else {
    t = 1.0 - 2.0 / (exp_impl(2 * a) + 1.0);
  }
  return x < 0 ? -t : t;
}

// erf: the Maclaurin series below 3 (cancellation costs < 1e-12 there), else 1 - erfc with erfc's
// asymptotic series (four terms: relative error < 1e-3 of erfc(3) = 2.2e-5, less further out).
double erf_impl(double x) {
  if (x != x) return x;
  const double a = x < 0 ? -x : x;
  double r;
  if (a < 3) {
    double term = a, sum = a;  // term = (-1)^n a^(2n+1) / n!
    for (int n = 1; n < 80; ++n) {
      term *= -a * a / n;
      sum += term / (2 * n + 1);
    }
    r = sum * 1.12837916709551257390;  // 2 / sqrt(pi)
  } else {
    const double z = 1 / (2 * a * a);
    const double series = 1 - z + 3 * z * z - 15 * z * z * z;
    r = 1 - exp_impl(-a * a) / (a * 1.77245385090551602730) * series;  // sqrt(pi)
  }
  return x < 0 ? -r : r;
}

}  // namespace

extern "C" {
double erf(double x) { return erf_impl(x); }
float erff(float x) { return float(erf_impl(x)); }
double exp(double x) { return exp_impl(x); }
float expf(float x) { return float(exp_impl(x)); }
double tanh(double x) { return tanh_impl(x); }
float tanhf(float x) { return float(tanh_impl(x)); }
double fabs(double x) { return x < 0 ? -x : (x == 0 ? 0.0 : x); }
float fabsf(float x) { return x < 0 ? -x : (x == 0 ? 0.f : x); }
double sqrt(double x) {
  asm("sqrtsd %1, %0" : "=x"(x) : "x"(x));
  return x;
}
float sqrtf(float x) {
  asm("sqrtss %1, %0" : "=x"(x) : "x"(x));
  return x;
}

// printf for the conversions the tests use: %s %c %d %i %u %x %ld %lld %zu %zd %g %f %e (with or
// without a precision: nine significant digits always), %%.
int printf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  for (const char* p = fmt; *p; ++p) {
    if (*p != '%') {
      const char c[2] = {*p, 0};
      emu::put(c);
      continue;
    }
    ++p;
    while (*p == '.' || (*p >= '0' && *p <= '9') || *p == '-' || *p == '+') ++p;  // width, precision
    bool wide = false;  // l, ll, z: a 64-bit argument
    for (; *p == 'l' || *p == 'z'; ++p) wide = true;
    switch (*p) {
      case 's': emu::put(va_arg(ap, const char*)); break;
      case 'c': {
        const char c[2] = {char(va_arg(ap, int)), 0};
        emu::put(c);
        break;
      }
      case 'd': case 'i':
        emu::put_int(wide ? va_arg(ap, long long) : va_arg(ap, int));
        break;
      case 'u': case 'x':
        if (wide) {
          const unsigned long long v = va_arg(ap, unsigned long long);
          *p == 'x' ? emu::put_hex(v) : emu::put_int(int64_t(v));
        } else {
          const unsigned v = va_arg(ap, unsigned);
          *p == 'x' ? emu::put_hex(v) : emu::put_int(int64_t(v));
        }
        break;
      case 'g': case 'f': case 'e': emu::put_float(va_arg(ap, double)); break;
      case '%': emu::put("%"); break;
      default: die("printf: unsupported conversion");
    }
  }
  va_end(ap);
  return 0;
}

int puts(const char* s) {
  emu::log(s, "\n");
  return 0;
}

// Static destructors never run (the program ends with hlt).
int __cxa_atexit(void (*)(void*), void*, void*) { return 0; }
void* __dso_handle = nullptr;

// Landing pads refer to these; nothing here throws (see above), so they are never entered.
void _Unwind_Resume(void*) { die("_Unwind_Resume: an exception was thrown"); }
int __gxx_personality_v0(...) { die("__gxx_personality_v0: an exception was thrown"); }
}

void* operator new(size_t n) { return emu::alloc(n); }
void* operator new[](size_t n) { return emu::alloc(n); }
void operator delete(void*) noexcept {}
void operator delete(void*, size_t) noexcept {}
void operator delete[](void*) noexcept {}
void operator delete[](void*, size_t) noexcept {}

namespace std {
void __throw_bad_alloc() { die("std::bad_alloc"); }
void __throw_bad_array_new_length() { die("std::bad_array_new_length"); }
void __throw_length_error(const char* what) { die(what); }
void __throw_out_of_range(const char* what) { die(what); }
void __throw_logic_error(const char* what) { die(what); }
void __throw_invalid_argument(const char* what) { die(what); }
ios_base::Init::Init() {}
ios_base::Init::~Init() {}
}  // namespace std
