#!/usr/bin/env bash
# Builds the CPU microkernel test programs (tests/cpp/) and runs them: natively, then cross-compiled
# for AArch64 and run under qemu-aarch64 twice, on an emulated CPU with the dot-product extension
# (-cpu max: the neon_dotprod kernel) and on one without it (-cpu cortex-a53: the plain NEON
# kernel), so that every ARM path runs here, not only compiles.
#
#   scripts/check_microkernels.sh [native|aarch64|all|tools]     (default: all)
#
# `tools` only makes sure the AArch64 tools are there (installing them as below); CI runs it before
# the test suite, whose tests/quantized/test_microkernels.py then runs both parts.
#
# Programs:
#   qgemm_test  the int8 kernels (csrc/quantized/qgemm_*.cpp; plain C++17, no torch)
#   vec_test    the fp32 recurrent step (csrc/rnn/isa/cpu_step.h, at::vec), the packed forward's
#               blocks (csrc/rnn/isa/packed_block.h), the optimizer update math (csrc/optim/math.h)
#               with at::vec vectors, and the int8 MoE vector helpers (csrc/quantized/isa/qmoe_vec.cpp):
#               header-only use of torch's include folder (C++20), no libtorch linked. Built when
#               `$PYTHON -c "import torch"` works.
#
#   x86emu      the x86-64 AVX-512 code, as freestanding programs (no OS, no libc: tests/cpp/emu/)
#               run by scripts/emulate_x86.py on Bochs's Tiger Lake model (AVX-512 F/BW/DQ/VL + VNNI)
#               through the PyPI package bochscpu-python:
#               - qgemm_emu: the avx512_vnni int8 kernels on qgemm_test's cases. It also runs on
#                 Skylake-X (AVX-512 without VNNI), where it must report the missing VNNI and, told to
#                 run anyway, stop with #UD: the emulated model really gates the instructions, so the
#                 passing run executed them. And a run past its --timeout must be stopped (exit 124).
#               - vec_test itself, built with setup.py's avx512 variant flags (at::vec 16-float
#                 vectors) and tests/cpp/emu/hosted_shim.cpp (printf, new, exp/tanh/erf without libc).
#               Needs `$PYTHON scripts/emulate_x86.py --check` to pass (bochscpu-python installed);
#               otherwise exit 3, saying so; `all` skips it then.
#
# The AArch64 part needs aarch64-linux-gnu-g++ (Debian: g++-aarch64-linux-gnu) and qemu-aarch64
# (Debian: qemu-user). When they are missing: as root with CI=true they are apt-get installed;
# otherwise the script says what to install and exits 3.
#
# Environment: CXX (native compiler, g++), CROSS_CXX (aarch64-linux-gnu-g++), QEMU (qemu-aarch64),
# QEMU_SYSROOT (/usr/aarch64-linux-gnu), PYTHON (python3), BUILD_DIR (a temporary folder).
# Exit status: 0 when every program passed; 1 on a mismatch or a build error; 3 tools missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHAT="${1:-all}"
case "$WHAT" in native | aarch64 | x86emu | all | tools) ;; *)
  echo "usage: $0 [native|aarch64|x86emu|all|tools]" >&2
  exit 2
  ;;
esac

CXX="${CXX:-g++}"
CROSS_CXX="${CROSS_CXX:-aarch64-linux-gnu-g++}"
QEMU="${QEMU:-qemu-aarch64}"
QEMU_SYSROOT="${QEMU_SYSROOT:-/usr/aarch64-linux-gnu}"
PYTHON="${PYTHON:-python3}"
if [ -z "${BUILD_DIR:-}" ]; then
  BUILD_DIR="$(mktemp -d)"
  trap 'rm -rf "$BUILD_DIR"' EXIT
fi
mkdir -p "$BUILD_DIR"
START=$SECONDS

log() { echo "[check_microkernels $((SECONDS - START))s] $*"; }

# The int8 kernels: every qgemm_*.cpp but the selection by name, which raises torch errors.
QGEMM_SRCS=()
for f in csrc/quantized/qgemm_*.cpp; do
  [ "$f" = csrc/quantized/qgemm_select.cpp ] || QGEMM_SRCS+=("$f")
done
COMMON_FLAGS=(-O2 -Wall -Wextra -Wno-maybe-uninitialized -Icsrc)

# vec_test and the at::vec source it checks besides the headers it includes.
VEC_SRCS=(tests/cpp/vec_test.cpp csrc/quantized/isa/qmoe_vec.cpp)

# torch's include folder, for vec_test (empty: vec_test is skipped, saying why).
TORCH_INC="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))' \
  2>/dev/null || true)"

build_and_run() {  # build_and_run LABEL COMPILER EXTRA_FLAGS RUNNER... -- ARGS
  local label="$1" cxx="$2" extra="$3"
  shift 3
  local runner=()
  while [ "$1" != "--" ]; do runner+=("$1"); shift; done
  shift
  local bin="$BUILD_DIR/qgemm_test_$label"
  log "$label: building qgemm_test with $cxx"
  # shellcheck disable=SC2086
  "$cxx" -std=c++17 "${COMMON_FLAGS[@]}" $extra "${QGEMM_SRCS[@]}" tests/cpp/qgemm_test.cpp -o "$bin"
  log "$label: running qgemm_test $*"
  "${runner[@]}" "$bin" "$@"
}

build_vec_test() {  # build_vec_test LABEL COMPILER EXTRA_FLAGS: sets VEC_BIN, or "" (skipped, saying why)
  local label="$1" cxx="$2" extra="$3"
  VEC_BIN=""
  if [ -z "$TORCH_INC" ]; then
    log "$label: skipping vec_test: '$PYTHON -c \"import torch\"' failed (torch's headers are needed)"
    return 0
  fi
  log "$label: building vec_test with $cxx (torch headers: $TORCH_INC)"
  # shellcheck disable=SC2086
  "$cxx" -std=c++20 -O2 -Wall -Icsrc -isystem "$TORCH_INC" $extra "${VEC_SRCS[@]}" -o "$BUILD_DIR/vec_test_$label"
  VEC_BIN="$BUILD_DIR/vec_test_$label"
}

run_native() {
  local san=""
  # Sanitizers catch a kernel reading past a row's K elements (the test's matrices end exactly there).
  if echo 'int main(){}' | "$CXX" -x c++ -fsanitize=address,undefined - -o "$BUILD_DIR/san_probe" 2>/dev/null; then
    san="-fsanitize=address,undefined -fno-sanitize-recover=all -g"
  fi
  build_and_run native "$CXX" "$san" env --
  # The extension's own vector flags on x86-64 (setup.py: AVX2 when the build machine has it).
  local vflags=""
  if grep -qw avx2 /proc/cpuinfo 2>/dev/null && grep -qw fma /proc/cpuinfo && grep -qw f16c /proc/cpuinfo; then
    vflags="-mavx2 -mfma -mf16c -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2"
  fi
  build_vec_test native "$CXX" "$vflags"
  if [ -n "$VEC_BIN" ]; then
    log "native: running vec_test"
    "$VEC_BIN"
  fi
}

need_cross_tools() {
  local missing=()
  command -v "$CROSS_CXX" >/dev/null || missing+=(g++-aarch64-linux-gnu)
  command -v "$QEMU" >/dev/null || missing+=(qemu-user)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && [ "${CI:-}" = true ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]} (CI=true, root)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if command -v "$CROSS_CXX" >/dev/null && command -v "$QEMU" >/dev/null; then return 0; fi
    echo "check_microkernels: installed ${missing[*]}, but $CROSS_CXX or $QEMU is still not on PATH" >&2
    exit 3
  fi
  echo "check_microkernels: the AArch64 check needs ${missing[*]}: install them (Debian/Ubuntu:" \
    "apt-get install ${missing[*]}), or run as root with CI=true to have this script install them" >&2
  exit 3
}

run_aarch64() {
  need_cross_tools
  local q=("$QEMU" -L "$QEMU_SYSROOT")
  # -cpu max has FEAT_DotProd: the sdot kernel must be offered and pass.
  # -Wno-psabi: GCC's notes on an ABI change of GCC 10 for std::pair arguments (torch's headers).
  build_and_run aarch64 "$CROSS_CXX" "-Wno-psabi" "${q[@]}" -cpu max -- --expect neon --expect neon_dotprod
  # Cortex-A53 (Armv8.0) has no dot product: the CPU test must say so and the plain kernel runs.
  log "aarch64: running qgemm_test on -cpu cortex-a53"
  "${q[@]}" -cpu cortex-a53 "$BUILD_DIR/qgemm_test_aarch64" --expect neon --expect-absent neon_dotprod
  build_vec_test aarch64 "$CROSS_CXX" "-Wno-psabi"
  if [ -n "$VEC_BIN" ]; then
    log "aarch64: running vec_test (-cpu max)"
    "${q[@]}" -cpu max "$VEC_BIN"
  fi
}

# Freestanding: the code the harness loads at a fixed address, with no OS under it. -mno-red-zone is
# not needed (no interrupts arrive); no exceptions, RTTI or thread-safe statics (no runtime for them).
EMU_FLAGS=(-O2 -Wall -Wextra -Wno-maybe-uninitialized -Wno-ignored-attributes -Icsrc -ffreestanding -fno-exceptions
  -fno-rtti -fno-threadsafe-statics -fno-stack-protector -fno-pic -fno-pie -fcf-protection=none
  -fno-asynchronous-unwind-tables -fno-unwind-tables -nostdlib -static -no-pie -Wl,--build-id=none
  -Wl,-T,tests/cpp/emu/emu.ld)
# GNU ld >= 2.39 warns about the single RWX segment the flat layout uses.
if "$CXX" -Wl,--no-warn-rwx-segments -x c++ - -o "$BUILD_DIR/ld_probe" <<<'int main(){}' 2>/dev/null; then
  EMU_FLAGS+=(-Wl,--no-warn-rwx-segments)
fi
# setup.py's flags for the library's avx512 variant.
AVX512_FLAGS=(-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512)
EMU=("$PYTHON" scripts/emulate_x86.py --timeout "${EMU_TIMEOUT:-300}")

bochscpu_usable() { "$PYTHON" scripts/emulate_x86.py --check; }

run_x86emu() {
  local bin="$BUILD_DIR/qgemm_emu"
  log "x86emu: building qgemm_emu (freestanding) with $CXX"
  "$CXX" -std=c++17 "${EMU_FLAGS[@]}" csrc/quantized/qgemm_avx512.cpp csrc/quantized/qgemm_avx2.cpp \
    tests/cpp/emu/qgemm_emu.cpp tests/cpp/emu/emu_rt.cpp -lgcc -o "$bin"
  log "x86emu: running qgemm_emu on the emulated tigerlake"
  "${EMU[@]}" --cpu tigerlake "$bin"
  log "x86emu: qgemm_emu on corei7_skylake_x (no VNNI) must refuse, and fault when forced"
  local out
  out="$("${EMU[@]}" --cpu corei7_skylake_x "$bin")" && out+=$'\n(exit status 0)'
  echo "$out"
  if ! grep -q "lacks avx512vnni" <<<"$out" || grep -q "exit status 0" <<<"$out"; then
    echo "check_microkernels: qgemm_emu did not report the missing VNNI on Skylake-X" >&2
    exit 1
  fi
  "${EMU[@]}" --cpu corei7_skylake_x --guest-arg 1 --expect-fault 6 "$bin"
  log "x86emu: a run past its time limit must be stopped (exit 124), not hang"
  local rc=0
  "$PYTHON" scripts/emulate_x86.py --timeout 0.5 "$bin" || rc=$?
  if [ "$rc" != 124 ]; then
    echo "check_microkernels: emulate_x86.py --timeout 0.5 returned $rc, not 124" >&2
    exit 1
  fi
  # torch's headers need exceptions and RTTI to compile; nothing in the tested code throws.
  # -Wno-uninitialized: GCC 12's _mm512_reduce_add_ps (avx512fintrin.h) warns about its own
  # deliberately undefined register (`__Y = __Y`).
  local flags=(-Wno-uninitialized)
  for f in "${EMU_FLAGS[@]}"; do
    case "$f" in -fno-exceptions | -fno-rtti) ;; *) flags+=("$f") ;; esac
  done
  if [ -z "$TORCH_INC" ]; then
    log "x86emu: skipping vec_test: '$PYTHON -c \"import torch\"' failed (torch's headers are needed)"
    return 0
  fi
  log "x86emu: building vec_test (freestanding, setup.py's avx512 flags) with $CXX"
  "$CXX" -std=c++20 "${flags[@]}" -isystem "$TORCH_INC" "${AVX512_FLAGS[@]}" "${VEC_SRCS[@]}" \
    tests/cpp/emu/hosted_shim.cpp tests/cpp/emu/emu_rt.cpp -lgcc -o "$BUILD_DIR/vec_test_emu"
  log "x86emu: running vec_test on the emulated tigerlake"
  "${EMU[@]}" --cpu tigerlake "$BUILD_DIR/vec_test_emu"
}

case "$WHAT" in
  native) run_native ;;
  aarch64) run_aarch64 ;;
  x86emu)
    bochscpu_usable || exit 3
    run_x86emu
    ;;
  tools) need_cross_tools ;;
  all)
    run_native
    run_aarch64
    if bochscpu_usable; then run_x86emu; else log "skipping x86emu (bochscpu-python is not installed)"; fi
    ;;
esac
log "passed ($WHAT)"
