#!/usr/bin/env bash
# The CPU-only, Triton-free configuration, as a user without a GPU installs fastnn: torch's CPU wheel
# (FASTNN_CPU_TORCH, default torch==2.13.0), FASTNN_BUILD_CUDA=0, no triton. It makes .venv-cpu,
# builds a wheel there and installs it (scripts/env.sh, FASTNN_INSTALL=wheel: the checkout's own
# editable build, against another torch, stays as it is), then runs the CPU and quantized tests and
# the wheel's tests (tests/test_packaging.py) against the installed wheel.
# `make test-cpu` and CI (.ci/run) run it; arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "fastnn cpu-only: $*" >&2; }

py=$(FASTNN_VENV="$PWD/.venv-cpu" FASTNN_TORCH=${FASTNN_CPU_TORCH:-torch==2.13.0} FASTNN_PACKAGES=minimal \
     FASTNN_INSTALL=wheel FASTNN_BUILD_EXT=1 FASTNN_BUILD_CUDA=0 bash scripts/env.sh)
# .venv-cpu is a venv of its own (no --system-site-packages, no .pth to another environment) and
# torch's CPU wheel does not depend on triton; PYTHONPATH could still bring it in.
unset PYTHONPATH
if "$py" -c 'import triton' 2>/dev/null; then
  log "triton is importable in .venv-cpu ($("$py" -c 'import triton; print(triton.__file__)')): not a Triton-free environment"
  exit 1
fi
wheel=$(ls "$PWD"/build/wheel-.venv-cpu/dist/*.whl)

# The tests run in a copy of the tree without fastnn/: run from the checkout, `import fastnn` (pytest
# puts the root on sys.path, and so does `python -c` in the tests' subprocesses) would find the
# checkout's package, whose compiled library, if any, was built against another torch.
tree=build/cpu-only-tests
rm -rf "$tree" && mkdir -p "$tree"
git ls-files -z --cached --others --exclude-standard | { grep -zv '^fastnn/' || true; } \
  | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$tree"

# The wheel's smoke test also runs its Triton kernels, with the Triton of the main environment
# (.venv) when that has one: torch's CPU wheel pins none.
triton=${FASTNN_TRITON_PACKAGE:-$(.venv/bin/python -c 'import os, triton; print(os.path.dirname(triton.__file__))' 2>/dev/null || true)}

# What differs from the main job is the build (torch's CPU wheel, no CUDA, no Triton), not the
# kernels' code: the install's own checks, the quantized family, and every other family's CPU-backend
# op tests (-k cpu), less the largest sweep and the timing check. Fuzzing, the remaining backends and
# the models are the main job's (.ci/run prints how long each job took).
tests=(tests/test_extension.py tests/test_import.py tests/test_packaging.py tests/quantized
       tests/optim/test_ops.py tests/rnn/test_ops.py tests/moe/test_ops.py tests/moe/test_layer.py)
select="not seq_forward_backward_matches_reference and not adds_at_most"
select="$select and (cpu or quantized or test_extension or test_import or test_packaging)"
log "testing $wheel with torch $("$py" -c 'import torch; print(torch.__version__)')"
cd "$tree"
FASTNN_EXPECT_BUILD=cpu-wheel FASTNN_WHEEL="$wheel" FASTNN_TRITON_PACKAGE="$triton" \
  "$py" -m pytest -p no:cacheprovider -q -m "not gpu and not fuzz" -k "$select" "${tests[@]}" "$@"
