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
            statsmodels:statsmodels hypothesis:hypothesis; do
  mod=${pair%%:*}; pkg=${pair#*:}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  pip_install "${missing[@]}"
fi

# ccache makes rebuilds of unchanged sources free; torch's build uses it when it is on the PATH.
if ! command -v ccache >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  log "installing ccache"
  (apt-get install -y -q ccache >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q ccache >/dev/null 2>&1)) \
    || log "ccache could not be installed; building without it"
fi

# Build fastnn in place. CUDA_HOME: setup.py finds the toolkit itself.
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building fastnn (FASTNN_BUILD_EXT=${FASTNN_BUILD_EXT:-1} FASTNN_BUILD_CUDA=${FASTNN_BUILD_CUDA:-auto} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0})"
start=$(date +%s)
if ! "$PY" -m pip install --no-build-isolation --no-deps -e . >build.log 2>&1; then
  tail -n 60 build.log >&2
  log "build failed (full log: build.log)"
  exit 1
fi
log "built in $(( $(date +%s) - start )) s"
echo "$PY"
