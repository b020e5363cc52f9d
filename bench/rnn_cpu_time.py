"""The CPU rows of TARGETS.md (LSTM/GRU), timed in CPU time on one thread.

fastnn-bench times wall clock with the machine's threads, which is what a user sees, but on a
shared machine another process's load swings those numbers by 10x. CPU time on one thread
(time.process_time) is immune to time slicing (not to cache contention), so it is the number to
compare runs by when the machine is not idle:

    python bench/rnn_cpu_time.py [--repeats 3]
"""

import argparse
import statistics
import time

import torch

import fastnn

ROWS = [("LSTM", 64, 1, 128, 256, False), ("GRU", 64, 1, 128, 256, False), ("LSTM", 100, 32, 256, 256, False),
        ("GRU", 100, 32, 256, 256, False), ("LSTM", 100, 32, 256, 256, True), ("GRU", 100, 32, 256, 256, True)]


def cpu_ms(fn, n):
    for _ in range(2):
        fn()
    samples = []
    for _ in range(n):
        t = time.process_time()
        fn()
        samples.append(time.process_time() - t)
    return statistics.median(samples) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (the median is reported)")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, CPU time; median of {args.repeats} alternating rounds")
    for kind, T, B, I, H, train in ROWS:
        base = getattr(torch.nn, kind)(I, H)
        fast = getattr(fastnn, kind)(I, H)
        fast.load_state_dict(base.state_dict())
        x = torch.randn(T, B, I, requires_grad=train)
        n = 20 if B == 1 else 5

        def run(m):
            if train:
                return lambda: m(x)[0].sum().backward()

            def infer():
                with torch.no_grad():
                    m(x)
            return infer

        tb, tf = [], []
        for _ in range(args.repeats):
            tb.append(cpu_ms(run(base), n))
            tf.append(cpu_ms(run(fast), n))
        b, f = statistics.median(tb), statistics.median(tf)
        what = "train" if train else "infer"
        print(f"{kind:4s} {what} T={T} B={B} I={I} H={H}: torch.nn {b:8.2f} ms  fastnn {f:8.2f} ms  {b / f:5.2f}x",
              flush=True)


if __name__ == "__main__":
    main()
