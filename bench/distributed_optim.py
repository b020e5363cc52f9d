"""Per-step time of FSDP2 + fastnn.optim.AdamW against FSDP2 + torch.optim.AdamW(fused=True), on
gloo processes on the CPU, measured in the same run.

    python bench/distributed_optim.py                 # 2 processes, 4 Linear 1024x1024 layers
    python bench/distributed_optim.py --quick         # tiny sizes: checks that the script runs

Both setups are built from the same weights on every rank and run in alternating rounds (the
order flips each round), so drifts of the machine's load fall on both alike. Each step is timed
between barriers on every rank; a step's time is its slowest rank's. Reported per setup: the
median and the quartiles of the whole step (forward + backward + optimizer step) and of the
optimizer step alone, with the CPU model, the ISA torch's kernels use and the threads per rank.
Run it on a quiet machine: other work on the cores shows up as noise in both columns.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _model(args) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.dim, args.dim), nn.GELU()]
    return nn.Sequential(*layers)


def _setup(name: str, args, mesh):
    import fastnn
    from torch.distributed.fsdp import fully_shard

    model = _model(args)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if name == "fastnn":
        opt = fastnn.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
    return model, opt


def _timed_step(model, opt, x) -> tuple[float, float]:
    dist.barrier()
    t0 = time.perf_counter()
    model(x).square().mean().backward()
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _rank(rank: int, world: int, port: int, args, out) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        setups = {name: _setup(name, args, mesh) for name in ("fastnn", "torch")}
        x = torch.randn(args.batch, args.dim, generator=torch.Generator().manual_seed(rank))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        for name, (model, opt) in setups.items():
            for _ in range(args.warmup):
                _timed_step(model, opt, x)
        for r in range(args.rounds):
            order = list(setups) if r % 2 == 0 else list(setups)[::-1]
            for name in order:
                model, opt = setups[name]
                times[name] += [_timed_step(model, opt, x) for _ in range(args.steps)]
        # A step takes as long as its slowest rank.
        for name in times:
            t = torch.tensor(times[name], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[name] = t.tolist()
        if rank == 0:
            out.put(times)
    finally:
        dist.destroy_process_group()


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="gloo processes (default 2)")
    ap.add_argument("--layers", type=int, default=4, help="Linear layers (default 4)")
    ap.add_argument("--dim", type=int, default=1024, help="features of each Linear (default 1024)")
    ap.add_argument("--batch", type=int, default=32, help="rows of each rank's batch (default 32)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per setup and round (default 10)")
    ap.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per setup first (default 3)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="intra-op threads per process (default: cores / 2)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: only checks that the script runs")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.dim, args.batch, args.steps, args.rounds, args.warmup, args.threads = 2, 64, 4, 2, 2, 1, 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_rank, args=(args.world, port, args, out), nprocs=args.world, start_method="spawn")
    times = out.get()

    params = args.layers * (args.dim * args.dim + args.dim)
    from fastnn.bench.cli import device_description

    cpu = device_description(torch.device("cpu"))
    print(f"CPU: {cpu['cpu_name']}; ISA: {cpu['isa']} (torch kernels: {cpu['torch_cpu_capability']}); "
          f"torch {torch.__version__}")
    print(f"FSDP2 on {args.world} gloo processes x {args.threads} threads; {args.layers} x Linear({args.dim}, "
          f"{args.dim}) = {params / 1e6:.2f}M parameters; batch {args.batch} per rank; "
          f"{args.rounds} rounds x {args.steps} steps per setup")
    print(f"{'optimizer':<36} {'step ms: q1 / median / q3':>28} {'optimizer.step ms: q1 / median / q3':>38} "
          f"{'forward+backward ms: median':>28}")
    labels = {"fastnn": "fastnn.optim.AdamW", "torch": "torch.optim.AdamW(fused=True)"}
    medians = {}
    for name, rows in times.items():
        whole = _quartiles([r[0] * 1e3 for r in rows])
        opt = _quartiles([r[1] * 1e3 for r in rows])
        medians[name] = whole[1]
        # forward + backward (FSDP2's all-gathers and reduce-scatters included): what the optimizer
        # does not run, so a difference there is noise or memory placement, not the optimizer
        fwd_bwd = statistics.median([(r[0] - r[1]) * 1e3 for r in rows])
        print(f"{labels[name]:<36} {whole[0]:>10.3f} / {whole[1]:.3f} / {whole[2]:.3f} "
              f"{opt[0]:>18.3f} / {opt[1]:.3f} / {opt[2]:.3f} {fwd_bwd:>28.3f}")
    print(f"median step time fastnn / torch: {medians['fastnn'] / medians['torch']:.3f}")


if __name__ == "__main__":
    main()
