"""The CPU microkernels (int8 qgemm variants, the at::vec recurrent step and optimizer math) checked
by the C++ test programs in tests/cpp/, through scripts/check_microkernels.sh: natively always,
cross-compiled for AArch64 under qemu-aarch64 (with and without the dot-product extension)
when the cross compiler and qemu are installed, and the x86-64 AVX-512 code as freestanding programs
on an emulated CPU (Bochs, through bochscpu-python) when that package is installed."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "check_microkernels.sh")


def _run(part, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, BUILD_DIR=str(tmp_path))
    env.pop("CI", None)  # never apt-get install from a test run
    proc = subprocess.run(["bash", SCRIPT, part], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"check_microkernels.sh {part} failed (exit {proc.returncode}):\n{out}"
    return out


def test_native(tmp_path):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++, or $CXX) on PATH")
    out = _run("native", tmp_path)
    assert "qgemm_test" in out and "variants tested: default" in out, out


def test_aarch64_under_qemu(tmp_path):
    missing = [tool for tool, package in (("aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
                                          ("qemu-aarch64", "qemu-user"))
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian packages g++-aarch64-linux-gnu, "
                    "qemu-user; scripts/check_microkernels.sh installs them as root with CI=true)")
    out = _run("aarch64", tmp_path)
    # Both NEON paths ran: sdot on -cpu max, the plain kernel on a CPU without the extension.
    assert "variants tested: default neon neon_dotprod" in out, out
    assert "skip neon_dotprod: built, but this CPU lacks it" in out, out


def test_x86_avx512_under_emulation(tmp_path):
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler (g++, or $CXX) on PATH")
    probe = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "emulate_x86.py"), "--check"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip("the AVX-512 emulation needs the PyPI package bochscpu-python: "
                    + (probe.stdout + probe.stderr).strip())
    out = _run("x86emu", tmp_path)
    # The VNNI kernel ran on a CPU that has it, and a CPU without it refused, then faulted.
    assert "ok   avx512_vnni: 608 cases on the emulated CPU" in out, out
    assert "lacks avx512vnni" in out and "the expected exception 6 stopped the program" in out, out
    assert "did not finish within 0.5 s" in out, out  # the time limit stops a run
    # vec_test with the avx512 variant's at::vec (16 floats a vector), when torch's headers are there.
    assert "at::vec float width 16" in out or "skipping vec_test" in out, out
