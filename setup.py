"""Build of fastnn's compiled library, ``fastnn._C``.

Switches (environment):
  FASTNN_BUILD_EXT=0          pure-Python install: reference and Triton paths only.
  FASTNN_BUILD_CUDA=auto|0|1  add the CUDA sources. ``auto`` (default) adds them when torch is a
                              CUDA build and nvcc is found; ``1`` fails the build when it cannot.
  TORCH_CUDA_ARCH_LIST        architectures to compile for (default "8.0;9.0").
  MAX_JOBS                    parallel compile jobs (ninja).

CPU instruction sets. The library runs on any CPU of its architecture, and its vector kernels run at
the best instruction set the CPU has, chosen at run time (csrc/cpu_isa.h; FASTNN_CPU_ISA forces
one). To that end:
  - every source outside an ``isa/`` folder is compiled with no instruction-set flags (portable
    x86-64 or AArch64);
  - the sources in ``csrc/<family>/isa/*.cpp`` (the at::vec kernels; headers in that folder are
    included by them only) are compiled once per variant, with the flags of torch's CPU_CAPABILITY
    builds and -DFASTNN_ISA=<variant>, which puts every definition of the file in the namespace
    ``isa_<variant>`` of its family (cpu_isa.h, FASTNN_ISA_BEGIN):
      x86-64:  default (no flags), avx2 (AVX2+FMA+F16C), avx512 (AVX-512 F/BW/VL/DQ + FMA+F16C)
      others:  default only (at::vec uses NEON on AArch64 without flags)
    The families' dispatchers (csrc/<family>/cpu_dispatch.cpp and the like) call the active one.
    Every variant is always built (csrc/cpu_isa.cpp refers to each), so there is no build switch
    for the instruction set: one build serves every CPU of the architecture;
  - the int8 GEMM kernels (csrc/quantized/qgemm_*.cpp) carry target attributes instead.

Nothing here looks at whether a GPU is visible: the CI machine has none and must still compile
the CUDA sources so that a CUDA compile error fails CI.
"""

import glob
import os
import platform
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


_ISA_VARIANTS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}


def _isa_variants():
    """The variants of the isa/ sources, default first (see _IsaBuildExtension for why the order
    matters). Off x86-64 only default: csrc/cpu_isa.h refers to avx2/avx512 only there."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    return ["default", "avx2", "avx512"]


def _isa_build_ext(base):
    """torch's BuildExtension, compiling the isa/ sources once per variant (see the docstring)."""

    class _IsaBuildExtension(base):
        def build_extension(self, ext):
            isa_sources = getattr(ext, "fastnn_isa_sources", [])
            objects = []
            for variant in _isa_variants():
                flags = _ISA_VARIANTS[variant] + [f"-DFASTNN_ISA={variant}"]
                extra = ext.extra_compile_args
                # CUDAExtension's arguments are a dict {'cxx': [...], 'nvcc': [...]}; the isa sources
                # are C++ only, so only 'cxx' gets the variant's flags.
                post = dict(extra, cxx=extra["cxx"] + flags) if isinstance(extra, dict) else list(extra) + flags
                # self.compiler.compile is torch's ninja compile (ccache-wrapped, MAX_JOBS jobs in
                # parallel), one ninja file per variant in its own folder.
                objects += self.compiler.compile(
                    isa_sources,
                    output_dir=os.path.join(self.build_temp, "isa", variant),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=post,
                    depends=ext.depends,
                )
            # Link order: the base objects (ext.sources) first, then default, then avx2, avx512.
            # Inline functions and templates that several objects instantiate with the same name
            # (ATen's and the standard library's, e.g. std::fill<float*> or a scalar
            # fastnn::optim::sgd_update<float>) become COMDAT groups, and the linker (GNU ld, lld)
            # keeps the FIRST copy it sees. The avx2/avx512 objects' copies of such functions may use
            # AVX instructions; linked after a portable copy they are discarded, so the portable
            # path never calls one of them. (Everything fastnn defines in an isa/ source lies in a
            # namespace of its variant and is never shared; tests/test_cpu_isa.py checks the linked
            # library for AVX code outside those namespaces.)
            ext.extra_objects = list(getattr(ext, "fastnn_extra_objects", [])) + objects
            super().build_extension(ext)

    return _IsaBuildExtension


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

    all_cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    isa_sources = [p for p in all_cpp if "/isa/" in p.replace(os.sep, "/")]
    sources = [p for p in all_cpp if p not in isa_sources]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
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
    ext.fastnn_isa_sources = isa_sources
    # setuptools relinks only when a source or a dependency is newer than the library: the isa
    # sources are not in ext.sources, so name them (and the headers) here. (ninja's depfiles decide
    # what is recompiled.)
    ext.depends = isa_sources + sorted(glob.glob("csrc/**/*.h", recursive=True))
    ext.fastnn_extra_objects = list(ext.extra_objects)
    build_ext = _isa_build_ext(cpp_extension.BuildExtension).with_options(use_ninja=True)
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
