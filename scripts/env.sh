#!/usr/bin/env bash
# The one place that sets up the Python environment that runs fastnn, and builds fastnn into it.
# Prints that Python's path on stdout (everything else goes to stderr), so that callers do
#     PY=$(bash scripts/env.sh) && "$PY" -m pytest
#
# - A machine whose python3 already has torch (the GPU machines: torch 2.11, no network) uses it.
# - Otherwise (a fresh dev or CI machine) it makes .venv with torch==2.14.1, the CUDA build that
#   lies on disk here, so that the CUDA sources compile even without a GPU.
# - Then it installs the Python packages that are missing and builds fastnn in place
#   (pip install --no-build-isolation -e .), using ccache when it can.
# Environment: FASTNN_PYTHON (use this interpreter), FASTNN_VENV (make or use this venv instead of
# .venv), FASTNN_TORCH (pip spec, default torch==2.14.1), FASTNN_PACKAGES=all|minimal (minimal: only
# what the build and the core tests need), FASTNN_INSTALL=editable|wheel (see below), and the build
# switches of setup.py (FASTNN_BUILD_EXT, FASTNN_BUILD_CUDA, TORCH_CUDA_ARCH_LIST).
#
# FASTNN_INSTALL=wheel builds a wheel from a copy of the tree and installs it (not editable) into the
# environment. An editable build writes fastnn/_C*.so into the checkout, compiled against one torch:
# a second environment with another torch (CI's CPU-only job: torch's CPU wheel) cannot build in
# place in the same checkout without breaking the first. The copy also keeps the two builds'
# build/ folders apart, and the wheel is the artifact a user installs.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "fastnn env: $*" >&2; }
# pip, quietly: the local package index's configuration makes pip warn about every missing folder.
pip_install() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }

if [ -n "${FASTNN_PYTHON:-}" ]; then
  PY=$FASTNN_PYTHON
elif [ -n "${FASTNN_VENV:-}" ]; then
  # A venv of its own: no --system-site-packages and no .pth to another environment, so that what
  # it lacks (Triton, for the CPU-only job) stays lacking.
  [ -x "$FASTNN_VENV/bin/python" ] || { log "creating $FASTNN_VENV"; python3 -m venv "$FASTNN_VENV" >&2; }
  PY=$FASTNN_VENV/bin/python
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif python3 -c 'import torch' 2>/dev/null; then
  PY=$(command -v python3)
  log "using $PY, which has torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  log "creating .venv"
  python3 -m venv .venv >&2
  PY=.venv/bin/python
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
  log "installing ${FASTNN_TORCH:-torch==2.14.1}"
  pip_install "${FASTNN_TORCH:-torch==2.14.1}"
fi

# import name -> pip name, for what the build, tests, benchmarks and examples use.
packages="numpy:numpy pybind11:pybind11 ninja:ninja setuptools:setuptools wheel:wheel pytest:pytest hypothesis:hypothesis"
case ${FASTNN_PACKAGES:-all} in
  all) packages="$packages pytest_benchmark:pytest-benchmark matplotlib:matplotlib sklearn:scikit-learn \
                 transformers:transformers statsmodels:statsmodels onnx:onnx onnxruntime:onnxruntime onnxscript:onnxscript"
    # the AVX-512 emulation test (scripts/emulate_x86.py, Bochs); its wheels exist for x86-64 only
    if [ "$(uname -m)" = x86_64 ]; then packages="$packages bochscpu:bochscpu-python"; fi ;;
  minimal) ;;
  *) log "FASTNN_PACKAGES must be all or minimal, got ${FASTNN_PACKAGES}"; exit 2 ;;
esac
missing=()
for pair in $packages; do
  mod=${pair%%:*}; pkg=${pair#*:}
  # found, not imported: bochscpu's wheel needs a newer glibc to import (emulate_x86.py supplies it)
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null ||
    missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

# ccache makes rebuilds of unchanged sources free; torch's build uses it when it is on the PATH.
# It is not installed here behind the user's back: `apt-get install ccache` (Debian/Ubuntu) brings it.
command -v ccache >/dev/null 2>&1 || log "ccache not found: every build compiles from scratch (apt-get install ccache)"
# pip builds in a new temporary folder each time and the compile flags include -g, with which ccache
# hashes the working folder by default: without this every build would miss the cache.
export CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-1}

# What to build. FASTNN_BUILD_CUDA unset: the CUDA kernels are built where a GPU can run them (a
# GPU is visible), not on a machine without one; CI sets FASTNN_BUILD_CUDA=1 so that a CUDA compile
# error fails it. (setup.py itself never looks at the GPU: this script only chooses its switches.)
ext=${FASTNN_BUILD_EXT:-1}
cuda=${FASTNN_BUILD_CUDA:-}
if [ -z "$cuda" ]; then
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then cuda=1; else cuda=0; fi
fi
arch=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}

# One build per machine and mode: the README's two commands share it. The stamp records the sources'
# hash and the switches of the build; a build that has everything asked for is reused (a CUDA build
# serves a request without CUDA; a build for more architectures serves one for fewer).
install=${FASTNN_INSTALL:-editable}
case $install in
  editable)
    stamp=build/fastnn-build.stamp
    buildlog=build.log
    hashed="csrc kernels/cuda setup.py" ;;
  wheel)
    # build/wheel-<venv>/: the copy of the tree it builds from, the wheel (dist/) and the stamp.
    wdir=build/wheel-$(basename "$("$PY" -c 'import sys; print(sys.prefix)')")
    stamp=$wdir/fastnn-build.stamp
    buildlog=$wdir/build.log
    hashed="csrc kernels fastnn setup.py pyproject.toml" ;;   # a wheel holds a copy of the Python too
  *) log "FASTNN_INSTALL must be editable or wheel, got $install"; exit 2 ;;
esac
# shellcheck disable=SC2086
sources=$(find $hashed -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \
          -o -name '*.toml' -o -name 'py.typed' \) -not -path '*/__pycache__/*' 2>/dev/null | sort | xargs cat | sha1sum | cut -d' ' -f1)
torch_version="$("$PY" -c 'import sys, torch; print(torch.__version__, sys.prefix)')"
reusable() {
  [ -f "$stamp" ] || return 1
  if [ "$install" = editable ]; then ls fastnn/_C*.so >/dev/null 2>&1 || [ "$ext" = 0 ] || return 1; fi
  local s_sources s_ext s_cuda s_arch s_torch
  IFS='|' read -r s_sources s_ext s_cuda s_arch s_torch <"$stamp"
  [ "$s_sources" = "$sources" ] && [ "$s_ext" = "$ext" ] && [ "$s_torch" = "$torch_version" ] || return 1
  [ "$cuda" = 0 ] && return 0          # anything built serves a CPU-only request
  [ "$cuda" = auto ] && [ "$s_cuda" != 0 ] && return 0
  [ "$s_cuda" = 0 ] && return 1
  local a
  IFS=';' read -ra wanted <<<"$arch"
  for a in "${wanted[@]}"; do [[ ";$s_arch;" == *";$a;"* ]] || return 1; done
  return 0
}
if reusable; then
  log "reusing the $install build (FASTNN_BUILD_CUDA=$(cut -d'|' -f3 "$stamp"), TORCH_CUDA_ARCH_LIST=$(cut -d'|' -f4 "$stamp"))"
  echo "$PY"
  exit 0
fi

# Build fastnn. CUDA_HOME: setup.py finds the toolkit itself.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FASTNN_BUILD_EXT=$ext FASTNN_BUILD_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch
log "building fastnn ($install; FASTNN_BUILD_EXT=$ext FASTNN_BUILD_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch)"
start=$(date +%s)
build() {
  if [ "$install" = editable ]; then
    "$PY" -m pip install --no-build-isolation --no-deps -e .
    return
  fi
  # The copy holds what the wheel is built from: the files git tracks or would track (not the
  # checkout's own build outputs, fastnn/_C*.so above all).
  rm -rf "$wdir/src" "$wdir/dist" && mkdir -p "$wdir/src"
  local parts="setup.py pyproject.toml README.md LICENSE fastnn csrc kernels"
  if git rev-parse --git-dir >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    git ls-files -z --cached --others --exclude-standard -- $parts | tar --null -T - --ignore-failed-read -cf - | tar -xf - -C "$wdir/src"
  else
    # shellcheck disable=SC2086
    cp -r $parts "$wdir/src" && find "$wdir/src" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
  fi
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$wdir/dist" "$wdir/src" &&
    "$PY" -m pip install --no-deps --force-reinstall "$wdir"/dist/*.whl
}
mkdir -p "$(dirname "$buildlog")"
if ! build >"$buildlog" 2>&1; then
  tail -n 60 "$buildlog" >&2
  log "build failed (full log: $buildlog)"
  exit 1
fi
log "built in $(( $(date +%s) - start )) s${wdir:+; wheel: $(ls "$wdir"/dist/*.whl)}"
# Asked from outside the checkout: there, `import fastnn` is the installed one, not ./fastnn.
abs_py="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"   # PY may be relative to the checkout
built_cuda=$(cd / && "$abs_py" -c 'import fastnn._extension as e; print(int(e.built_with_cuda()))' 2>/dev/null || echo 0)
mkdir -p "$(dirname "$stamp")"
echo "$sources|$ext|$built_cuda|$arch|$torch_version" >"$stamp"
echo "$PY"
