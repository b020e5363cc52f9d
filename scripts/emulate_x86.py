#!/usr/bin/env python3
"""Runs a freestanding x86-64 test program on an emulated CPU (Bochs, through the PyPI package
bochscpu-python), so that code compiled for instruction sets this machine lacks (AVX-512, VNNI)
executes and is checked, not only compiled.

    emulate_x86.py [--cpu MODEL] [--timeout SECONDS] [--expect-fault VECTOR] [--guest-arg N] PROGRAM

PROGRAM is a static ELF built with tests/cpp/emu/emu.ld and emu_rt.h: no OS, no libc. Its
PT_LOAD segments are mapped at their addresses (identity-mapped, 4 KiB pages), the CPU starts at
the ELF entry in 64-bit ring 0 with SSE/AVX/AVX-512 state enabled (CR4.OSFXSR/OSXSAVE,
XCR0 = x87|SSE|AVX|opmask|ZMM), and the program ends with `hlt`, leaving its exit status in eax.
Its log (text, at the image's first address: a 64-bit length, then the bytes) is printed when it
stops, however it stops, and the status becomes ours.
--guest-arg N is in rdi at entry (emu::arg() in the program).

Any CPU exception (#UD for an instruction the model lacks, #GP, #PF, ...) stops the run: the
vector and the address are reported and the exit status is 1, unless --expect-fault names that
vector (then 0: a check that the emulated CPU rejects what it must). The emulation runs in a child
process killed after --timeout seconds (exit status 124), so a guest that loops cannot hang CI.

--cpu picks the Bochs CPU model by name (default tigerlake: AVX-512 F/CD/BW/DQ/VL/IFMA/VBMI/VBMI2/
VNNI/BITALG/VPOPCNTDQ). bochscpu-python 0.4.0 does not expose the model: its parameter table lists
fewer models than the Bochs it links (i486dx4 and athlon_xp are missing), so its "tigerlake"
default is Bochs's corei3_cnl (Cannon Lake: AVX-512 without VNNI). The model is therefore set by
Bochs's own index, through the parameter API the library exports, before the CPU is created; the
guest programs check CPUID themselves, so a wrong model fails loudly instead of testing less.

Exit status: the guest's; 1 on a fault; 3 when bochscpu-python is not installed; 124 on timeout.
"""

import argparse
import ctypes
import os
import struct
import subprocess
import sys
import tempfile

# Bochs 3.0's cpudb order (cpu/cpudb/cpudb.h): the index the "cpu.model" parameter holds.
BOCHS_MODELS = [
    "bx_generic", "i486dx4", "pentium", "pentium_mxx", "amd_k6_2_chomper", "athlon_xp", "p2_klamath",
    "p3_katmai", "p4_willamette", "core_duo_t2500_yonah", "atom_n270", "p4_prescott_celeron_336",
    "athlon64_clawhammer", "athlon64_venice", "turion64_tyler", "phenom_8650_toliman",
    "core2_penryn_t9600", "corei5_lynnfield_750", "corei5_arrandale_m520", "corei7_sandy_bridge_2600k",
    "zambezi", "trinity_apu", "ryzen", "corei7_ivy_bridge_3770k", "corei7_haswell_4770", "broadwell_ult",
    "corei7_skylake_x", "corei3_cnl", "corei7_icelake_u", "tigerlake", "sapphire_rapids", "arrow_lake",
]

PAGE = 4096
PML4_GPA = 0x4000_0000  # page tables live above the program (which links at 4 MiB)
LOG_ADDR, LOG_MAX = 0x40_0000, 64 * 1024 - 8  # emu.ld / emu_rt.cpp: the log's place and size
EXIT_NO_BOCHS, EXIT_TIMEOUT = 3, 124
FAULT_BASE = 64  # the child's exit status for CPU exception v is FAULT_BASE + v (v < 32)

# bochscpu-python 0.4.0's manylinux_2_28 wheel refers to two glibc 2.38 symbols without a version
# (C23's strtoull/sscanf). On an older glibc (Debian 12 has 2.36) they are supplied here, before the
# module loads; the C23 forms differ only in accepting 0b/%b binary input, which Bochs never parses.
_SHIM_C = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
unsigned long long __isoc23_strtoull(const char* s, char** e, int b) { return strtoull(s, e, b); }
int __isoc23_sscanf(const char* s, const char* f, ...) {
  va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r;
}
"""


def _import_bochscpu():
    """The bochscpu module, or an ImportError whose message says why not."""
    try:
        ctypes.CDLL(None).__isoc23_strtoull  # glibc >= 2.38 has them
    except AttributeError:
        shim = os.path.join(tempfile.gettempdir(), f"fastnn_isoc23_shim_{os.getuid()}.so")
        if not os.path.exists(shim):  # built once per user; concurrent builders each use their own files
            tmp = f"{shim}.{os.getpid()}"
            with open(tmp + ".c", "w") as f:
                f.write(_SHIM_C)
            cc = os.environ.get("CC", "cc")
            try:
                r = subprocess.run([cc, "-shared", "-fPIC", "-O2", tmp + ".c", "-o", tmp], capture_output=True, text=True)
            except OSError as e:
                raise ImportError(f"building the glibc shim for bochscpu needs a C compiler ({cc}): {e}") from e
            finally:
                os.unlink(tmp + ".c")
            if r.returncode != 0:
                raise ImportError(f"building the glibc shim for bochscpu failed: {r.stderr.strip()}")
            os.replace(tmp, shim)
        ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    import bochscpu  # noqa: F401
    import bochscpu.cpu
    import bochscpu.memory
    return bochscpu


def _set_model(bochscpu, name):
    """Selects Bochs's CPU model `name` for the CPUs created after this call."""
    lib = ctypes.CDLL(bochscpu._bochscpu.__file__)
    try:
        lib.sim_get_param_enum, lib._ZN14bx_param_num_c9set_rangeEmm  # noqa: B018
    except AttributeError as e:
        raise RuntimeError(f"this bochscpu build does not export Bochs's parameter API ({e}): cannot choose the "
                           "CPU model") from e
    lib.sim_get_param_enum.restype = ctypes.c_void_p
    lib.sim_get_param_enum.argtypes = [ctypes.c_char_p]
    param = lib.sim_get_param_enum(b"cpu.model")
    if not param:
        raise RuntimeError("bochscpu has no 'cpu.model' parameter")
    set_range = lib._ZN14bx_param_num_c9set_rangeEmm
    set_range.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64]
    set_value = lib._ZN15bx_param_enum_c3setEl
    set_value.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    get_value = lib._ZN14bx_param_num_c3getEv
    get_value.restype = ctypes.c_int64
    get_value.argtypes = [ctypes.c_void_p]
    index = BOCHS_MODELS.index(name)
    set_range(param, 0, len(BOCHS_MODELS) - 1)  # the library's table stops short of Bochs's
    set_value(param, index)
    if get_value(param) != index:
        raise RuntimeError(f"could not select CPU model {name}")


def _load_segments(path):
    """(entry, [(vaddr, memsz, data)]) of a little-endian x86-64 ELF executable."""
    with open(path, "rb") as f:
        elf = f.read()
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1 or struct.unpack_from("<H", elf, 18)[0] != 62:
        raise ValueError(f"{path}: not an x86-64 ELF64 file")
    entry, phoff = struct.unpack_from("<QQ", elf, 24)
    phentsize, phnum = struct.unpack_from("<HH", elf, 54)
    segs = []
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz, memsz, _align = struct.unpack_from("<IIQQQQQQ", elf, phoff + i * phentsize)
        if p_type == 1 and memsz:  # PT_LOAD
            segs.append((vaddr, memsz, elf[off:off + filesz]))
    return entry, segs


def _segment(base, limit, attr, selector):
    import bochscpu
    s = bochscpu.Segment()
    s.present, s.base, s.limit, s.attr, s.selector = True, base, limit, attr, selector
    return s


def emulate(path, model, guest_arg=0):
    """Runs the program; returns the exit status (printing its log, or what stopped it)."""
    bochscpu = _import_bochscpu()
    _set_model(bochscpu, model)
    mem = bochscpu.memory
    sess = bochscpu.Session()

    def missing_page(gpa):
        raise RuntimeError(f"the guest touched unmapped physical page {gpa:#x}")

    sess.missing_page_handler = missing_page
    entry, segs = _load_segments(path)
    table = mem.PageMapLevel4Table()
    for vaddr, memsz, _ in segs:
        for page in range(vaddr & ~(PAGE - 1), vaddr + memsz, PAGE):
            if table.translate(page) is None:
                mem.page_insert(page, mem.allocate_host_page())  # an anonymous mmap: zeroed (.bss)
                table.insert(page, page, 1)  # writable
    for hva, gpa in table.commit(PML4_GPA):
        mem.page_insert(gpa, hva)
    for vaddr, _, data in segs:
        if data and not mem.virt_write(PML4_GPA, vaddr, bytearray(data)):
            raise RuntimeError(f"could not write the segment at {vaddr:#x}")

    state = bochscpu.State()
    bochscpu.cpu.set_long_mode(state)
    cr4 = bochscpu.cpu.ControlRegister(state.cr4)
    cr4.OSFXSR = cr4.OSXMMEXCPT = cr4.OSXSAVE = True
    state.cr4 = int(cr4)
    state.xcr0 = 0xE7  # x87, SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM
    state.mxcsr = 0x1F80
    state.cr3 = PML4_GPA
    state.rip = entry
    state.rflags = 0x2
    state.rdi = guest_arg
    state.cs = _segment(0, 0xFFFF_FFFF, 0x209B, 0x08)  # 64-bit code, ring 0
    data_seg = _segment(0, 0xFFFF_FFFF, 0xC093, 0x10)
    state.ds = state.ss = state.es = state.fs = state.gs = data_seg
    sess.cpu.state = state

    stop = {}

    def on_hlt(s, _cpu):
        stop["hlt"] = True
        s.stop()

    def on_exception(s, _cpu, vector, error_code):
        stop.setdefault("fault", (vector, error_code, s.cpu.rip))
        s.stop()

    hook = bochscpu.Hook()
    hook.hlt = on_hlt
    hook.exception = on_exception
    sess.run([hook])
    st = sess.cpu.state
    length = min(struct.unpack("<Q", bytes(mem.virt_read(PML4_GPA, LOG_ADDR, 8)))[0], LOG_MAX)
    if length:
        sys.stdout.write(bytes(mem.virt_read(PML4_GPA, LOG_ADDR + 8, length)).decode("utf-8", "replace"))
    if "fault" in stop:
        vector, error_code, rip = stop["fault"]
        names = {0: "#DE", 6: "#UD (an instruction this CPU model lacks)", 13: "#GP", 14: "#PF", 17: "#AC", 19: "#XM"}
        print(f"emulate_x86: CPU exception {vector} {names.get(vector, '')} near rip={rip:#x} "
              f"(error code {error_code:#x}, cr2={st.cr2:#x}) on model {model}")
        return FAULT_BASE + vector
    if "hlt" not in stop:
        print(f"emulate_x86: the emulation stopped at rip={st.rip:#x} without hlt or an exception")
        return 1
    return 1 if st.rax & 0xFFFF_FFFF else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("program", nargs="?")
    ap.add_argument("--check", action="store_true", help="only say whether bochscpu-python is usable (exit 0 or 3)")
    ap.add_argument("--cpu", default="tigerlake", choices=BOCHS_MODELS)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--expect-fault", type=int, default=None, metavar="VECTOR")
    ap.add_argument("--guest-arg", type=int, default=0, metavar="N")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.check or args.program is None:
        try:
            _import_bochscpu()
        except ImportError as e:
            print(f"emulate_x86: bochscpu-python is not usable ({e}); pip install bochscpu-python")
            return EXIT_NO_BOCHS
        if args.program is None:
            print("emulate_x86: bochscpu-python is usable")
            return 0
    if args.child:
        try:
            status = emulate(args.program, args.cpu, args.guest_arg)
        except ImportError as e:
            print(f"emulate_x86: bochscpu-python is not usable ({e}); pip install bochscpu-python", flush=True)
            status = EXIT_NO_BOCHS
        except Exception as e:  # noqa: BLE001 - reported, then the exit below (not the crashing teardown)
            print(f"emulate_x86: could not run {args.program}: {type(e).__name__}: {e}", flush=True)
            status = 1
        sys.stdout.flush()
        os._exit(status)  # skips bochscpu's teardown, which crashes at interpreter exit
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--cpu", args.cpu, "--guest-arg", str(args.guest_arg),
           args.program]
    try:
        status = subprocess.run(cmd, timeout=args.timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"emulate_x86: {args.program} did not finish within {args.timeout:g} s on model {args.cpu} "
              "(a guest loop that never ends, or a test too large for the emulator)", flush=True)
        return EXIT_TIMEOUT
    if status < 0:
        print(f"emulate_x86: the emulator died (signal {-status}) running {args.program}", flush=True)
        return 1
    if status == EXIT_NO_BOCHS:
        return status
    fault = status - FAULT_BASE if FAULT_BASE <= status < FAULT_BASE + 32 else None
    if args.expect_fault is not None:
        if fault == args.expect_fault:
            print(f"emulate_x86: the expected exception {args.expect_fault} stopped the program on {args.cpu}")
            return 0
        print(f"emulate_x86: expected CPU exception {args.expect_fault} on {args.cpu}, got exit status {status}")
        return 1
    return 1 if fault is not None else status


if __name__ == "__main__":
    sys.exit(main())
