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
# Environment: FASTNN_PYTHON (use this interpreter), FASTNN_TORCH (pip spec, default torch==2.14.1),
# and the build switches of setup.py (FASTNN_BUILD_EXT, FASTNN_BUILD_CUDA, TORCH_CUDA_ARCH_LIST).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "fastnn env: $*" >&2; }
# pip, quietly: the local package index's configuration makes pip warn about every missing folder.
pip_install() { "$PY" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; } >&2; }

if [ -n "${FASTNN_PYTHON:-}" ]; then
  PY=$FASTNN_PYTHON
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
missing=()
for pair in numpy:numpy pybind11:pybind11 ninja:ninja pytest:pytest pytest_benchmark:pytest-benchmark \
            matplotlib:matplotlib sklearn:scikit-learn setuptools:setuptools wheel:wheel transformers:transformers \
            statsmodels:statsmodels hypothesis:hypothesis onnx:onnx onnxruntime:onnxruntime onnxscript:onnxscript; do
  mod=${pair%%:*}; pkg=${pair#*:}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
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

# One build per machine: the README's two commands share it. The stamp records the sources' hash and
# the switches of the build in place; a build that has everything asked for is reused (a CUDA build
# serves a request without CUDA; a build for more architectures serves one for fewer).
stamp=build/fastnn-build.stamp
sources=$(find csrc kernels/cuda setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) 2>/dev/null \
          | sort | xargs cat | sha1sum | cut -d' ' -f1)
torch_version="$("$PY" -c 'import sys, torch; print(torch.__version__, sys.prefix)')"
reusable() {
  [ -f "$stamp" ] || return 1
  ls fastnn/_C*.so >/dev/null 2>&1 || [ "$ext" = 0 ] || return 1
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
  log "reusing the build in place (FASTNN_BUILD_CUDA=$(cut -d'|' -f3 "$stamp"), TORCH_CUDA_ARCH_LIST=$(cut -d'|' -f4 "$stamp"))"
  echo "$PY"
  exit 0
fi

# Build fastnn in place. CUDA_HOME: setup.py finds the toolkit itself.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building fastnn (FASTNN_BUILD_EXT=$ext FASTNN_BUILD_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch)"
start=$(date +%s)
if ! FASTNN_BUILD_EXT=$ext FASTNN_BUILD_CUDA=$cuda TORCH_CUDA_ARCH_LIST=$arch \
     "$PY" -m pip install --no-build-isolation --no-deps -e . >build.log 2>&1; then
  tail -n 60 build.log >&2
  log "build failed (full log: build.log)"
  exit 1
fi
log "built in $(( $(date +%s) - start )) s"
mkdir -p build
built_cuda=$("$PY" -c 'import fastnn._extension as e; print(int(e.built_with_cuda()))' 2>/dev/null || echo 0)
echo "$sources|$ext|$built_cuda|$arch|$torch_version" >"$stamp"
echo "$PY"
