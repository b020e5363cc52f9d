#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one unattended call of under 10 minutes: build for
# the GPU present, the GPU tests and the Triton tests on the GPU, then the GPU benchmarks with the
# default paths and with the opt-in ones (FASTNN_RNN_PERSISTENT=1). Each step has its own time limit
# and a failing step does not stop the next; the last lines summarise every step's exit status.
#
#   bash scripts/gpu_session.sh                  # all of it; results in $OUT (or bench/results)
#   BENCH_ARGS="-k optim" bash scripts/gpu_session.sh
#
# What it writes (few files: the device tool brings back at most eight): session.log (every step's
# output), and the benchmark JSON + PNG of each benchmark run, ready to commit under bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
log="$out/session.log"
: >"$log"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTNN_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
summary=()

# step NAME SECONDS COMMAND...: run with a time limit, output to the log (and the terminal's tail).
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local note=""
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (timed out)"
  echo "=== $name: exit $rc$note in $((SECONDS - start)) s" | tee -a "$log"
  tail -n 15 "$log"
  summary+=("$name: exit $rc$note, $((SECONDS - start)) s")
  return $rc
}

step gpu-info 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
if step build 300 bash scripts/env.sh; then
  PY=$(bash scripts/env.sh 2>/dev/null)
  step build-info 60 "$PY" -c "import fastnn, torch; print(fastnn.build_info(), torch.cuda.get_device_name())"
  # The GPU tests, and every Triton test running natively on the GPU (no interpreter here).
  step tests-gpu 150 "$PY" -m pytest tests -q -p no:cacheprovider -m gpu
  step tests-triton 120 "$PY" -m pytest tests -q -p no:cacheprovider -k triton -m "not gpu and not fuzz"
  step bench-default 150 "$PY" -m fastnn.bench.cli --device cuda --out "$out" ${BENCH_ARGS:-}
  FASTNN_RNN_PERSISTENT=1 step bench-rnn-persistent 60 "$PY" -m fastnn.bench.cli --device cuda --out "$out" \
    -k rnn ${BENCH_ARGS:-}
fi
printf '%s\n' "=== summary" "${summary[@]}" | tee -a "$log"
