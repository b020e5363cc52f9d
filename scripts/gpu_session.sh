#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one call (device time is short): build for the GPU
# present, the whole test suite there (CUDA and Triton kernels run natively), then every benchmark.
# Logs and results go to $OUT (the device tool's output folder) or bench/results.
#
#   bash scripts/gpu_session.sh            # all of it
#   BENCH_ARGS="-k optim" bash scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTNN_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
PY=$(bash scripts/env.sh 2> >(tee "$out/build.log" >&2)) || { echo "build failed"; exit 1; }
"$PY" -c "import fastnn, torch; print(fastnn.build_info(), torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
"$PY" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -n 30
"$PY" -m fastnn.bench.cli --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -n 60
