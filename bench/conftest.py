"""pytest-benchmark suites over the cases of fastnn/bench (the same cases as `fastnn-bench`).

    python -m pytest bench/                       # every case on the best device present
    python -m pytest bench/ -k optim --benchmark-compare

Each case gives two benchmarks in one group: the torch baseline and fastnn. CUDA timings
synchronise the device around each call.
"""
