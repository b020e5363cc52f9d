"""Build of fastnn's compiled library, ``fastnn._C``.

Switches (environment):
  FASTNN_BUILD_EXT=0          pure-Python install: reference and Triton paths only.
  FASTNN_BUILD_CUDA=auto|0|1  add the CUDA sources. ``auto`` (default) adds them when torch is a
                              CUDA build and nvcc is found; ``1`` fails the build when it cannot.
  TORCH_CUDA_ARCH_LIST        architectures to compile for (default "8.0;9.0").
  MAX_JOBS                    parallel compile jobs (ninja).

Nothing here looks at whether a GPU is visible: the CI machine has none and must still compile
the CUDA sources so that a CUDA compile error fails CI.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    return os.environ.get(name, default).strip().lower()


def _find_cuda_home():
    """A CUDA toolkit root with both nvcc and the runtime headers, or None.

    ``/usr/local/bin/nvcc`` may be a wrapper script, so torch's guess (the parent of nvcc's
    folder) can point at a folder without headers; check each candidate for cuda_runtime.h.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _cpu_isa_flags():
    """Vector ISA for the CPU kernels (at::vec). The extension is built on the machine that runs it
    (pip install --no-build-isolation -e .), so ``auto`` uses AVX2+FMA when this CPU has them.
    FASTNN_BUILD_ISA=default builds portable code. (The int8 kernels are compiled for every ISA and
    chosen at run time: FASTNN_CPU_ISA.)"""
    isa = _flag("FASTNN_BUILD_ISA", "auto")
    if isa == "auto":
        flags = set()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        isa = "avx2" if {"avx2", "fma", "f16c"} <= flags else "default"
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa != "default":
        sys.exit(f"fastnn: FASTNN_BUILD_ISA must be auto, avx2 or default, got {isa!r}")
    return []


def _packages():
    pkgs = find_packages(include=["fastnn", "fastnn.*"])  # fastnn/py.typed ships through package_data
    # kernels/triton is installed as fastnn.kernels.
    return pkgs + ["fastnn.kernels"]


def _package_dir():
    return {"fastnn.kernels": "kernels/triton"}


def _extensions():
    if _flag("FASTNN_BUILD_EXT", "1") in ("0", "false", "no", "off"):
        print("fastnn: FASTNN_BUILD_EXT=0, installing pure Python (reference + Triton)")
        return [], {}

    want_cuda = _flag("FASTNN_BUILD_CUDA", "auto")
    if want_cuda not in ("auto", "0", "1"):
        sys.exit(f"fastnn: FASTNN_BUILD_CUDA must be auto, 0 or 1, got {want_cuda!r}")

    import torch

    cuda_home = _find_cuda_home()
    torch_has_cuda = torch.version.cuda is not None
    build_cuda = want_cuda == "1" or (want_cuda == "auto" and torch_has_cuda and cuda_home)
    if build_cuda and not (torch_has_cuda and cuda_home):
        why = "torch is a CPU build" if not torch_has_cuda else "no CUDA toolkit (nvcc + headers) found"
        sys.exit(f"fastnn: FASTNN_BUILD_CUDA=1 but {why}")
    if build_cuda:
        # Set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"] + _cpu_isa_flags()
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills"]

    if build_cuda:
        sources += sorted(glob.glob("kernels/cuda/**/*.cu", recursive=True))
        include_dirs.append(os.path.join(ROOT, "kernels", "cuda"))
        # pip's CUDA builds of torch ship the CUDA headers (cuBLAS, cuSPARSE, ...) that ATen's
        # CUDA headers include, under site-packages/nvidia/cu*/include; a bare toolkit lacks them.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
        define_macros.append(("FASTNN_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        print(f"fastnn: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        ext_cls = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        print("fastnn: building CPU kernels only"
              + ("" if want_cuda == "0" else " (torch is a CPU build or no CUDA toolkit was found)"))

    # OpenMP: at::parallel_for runs on torch's OpenMP pool; the extension must use the same one.
    extra["cxx"] = extra["cxx"] + ["-fopenmp"]
    ext = ext_cls(
        name="fastnn._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


def _install_requires(with_extension):
    """A compiled fastnn._C works only with the torch minor version it was built against (torch's
    C++ ABI changes between minors): pin it, as torchao and xformers do. A pure-Python install runs
    on any supported torch."""
    if not with_extension:
        return ["torch>=2.6", "numpy"]
    import torch

    major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return [f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy"]


ext_modules, cmdclass = _extensions()

setup(
    install_requires=_install_requires(bool(ext_modules)),
    packages=_packages(),
    package_dir=_package_dir(),
    package_data={"fastnn": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
