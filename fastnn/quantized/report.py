"""A float model against its int8 version in one table: a quality metric, the state_dict's bytes
and the latency of one call (what the examples' ``--quantize`` flag prints).

    from fastnn.quantized.report import compare
    res = compare(model, lambda m: accuracy(m, x_test, y_test), (x_test[:1],), metric="accuracy")

The latency is a median over repeated calls in this process: on a machine shared with other work
it says little; the benchmarks (``fastnn-bench``) are where speed is measured.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from .convert import quantize_dynamic

__all__ = ["compare", "state_dict_bytes", "latency_ms"]


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the tensors in ``model.state_dict()`` (the payload of a saved file, without the
    serialisation's own few hundred bytes per tensor)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def latency_ms(fn: Callable[[], Any], repeat: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` under ``torch.no_grad()``, after ``warmup`` calls."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def compare(model: nn.Module, evaluate: Callable[[nn.Module], float], sample: tuple, *, metric: str = "metric",
            sample_name: str = "one call", qmodel: Optional[nn.Module] = None, repeat: int = 30,
            print_fn: Callable[[str], Any] = print) -> dict:
    """Quantize a copy of ``model`` with :func:`fastnn.quantize_dynamic` (or take ``qmodel``) and print,
    for both: ``evaluate(m)`` (a float; ``m`` in eval mode), :func:`state_dict_bytes` and the median
    latency of ``m(*sample)``. ``model`` is left as it was. Returns ``{"fp32": {...}, "int8": {...},
    "qmodel": the int8 model}`` with keys ``metric``, ``bytes`` and ``ms`` in each row."""
    was_training = model.training
    model.eval()
    qmodel = quantize_dynamic(model) if qmodel is None else qmodel
    qmodel.eval()
    models = {"fp32": model, "int8": qmodel}
    rows = {name: {"metric": float(evaluate(m)), "bytes": state_dict_bytes(m)} for name, m in models.items()}
    # Alternating rounds, so that a change in the machine's load hits both alike; each row keeps the
    # median of its rounds' medians.
    rounds: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(3):
        for name, m in models.items():
            rounds[name].append(latency_ms(lambda: m(*sample), repeat=max(1, repeat // 3)))
    for name in models:
        rows[name]["ms"] = statistics.median(rounds[name])
    model.train(was_training)
    f, q = rows["fp32"], rows["int8"]
    threads = torch.get_num_threads()
    print_fn(f"fp32 against int8 dynamic (fastnn.quantize_dynamic), latency of {sample_name} "
             f"({threads} thread{'s' if threads != 1 else ''}):")
    print_fn(f"  {'':5} {metric:>14} {'state_dict bytes':>30} {'latency':>26}")
    speed = f["ms"] / q["ms"]
    print_fn(f"  {'fp32':5} {f['metric']:14.4f} {f['bytes']:30,d} {f['ms']:23.3f} ms")
    print_fn(f"  {'int8':5} {q['metric']:14.4f} {q['bytes']:16,d} ({q['bytes'] / f['bytes']:.3f}x the size) "
             f"{q['ms']:7.3f} ms ({speed:.2f}x {'faster' if speed >= 1 else 'as fast'})")
    return {"fp32": f, "int8": q, "qmodel": qmodel}
