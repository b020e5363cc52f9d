"""Runs a test body on N gloo processes on the CPU and reports every rank's failure.

    from tests.distributed._spawn import run_on_ranks
    def _body(rank, world, *args): ...      # module-level: spawned processes import it
    run_on_ranks(_body, world=2, args=(...))

Each rank gets one intra-op thread (the ranks share this machine's cores) and an initialised default
process group; a rank that raises makes the test fail with that rank's traceback. `timeout` bounds
the whole run: a rank stuck in a collective kills the group instead of hanging CI.
"""

import os
import socket
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, timeout, body, args, errors):
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        body(rank, world, *args)
        dist.barrier()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(body, world: int, args: tuple = (), timeout: float = 120.0) -> None:
    """Runs body(rank, world, *args) on `world` spawned processes; raises AssertionError with the
    tracebacks of the ranks that failed."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(_entry, args=(world, free_port(), timeout, body, args, errors), nprocs=world,
                           join=True, start_method="spawn")
    except mp.ProcessRaisedException:
        pass  # the traceback is in `errors`
    except mp.ProcessExitedException as e:  # killed (a crash, or the collective timeout)
        errors.put(str(e))
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not msgs, "\n".join(msgs)
