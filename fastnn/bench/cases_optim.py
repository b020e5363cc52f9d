"""Optimizer benchmark cases (fused Adam / AdamW).

Each case times one optimizer step over fixed gradients. The baseline is torch's fused AdamW
(the fastest torch has); the torch for-loop and foreach steps are shown beside it. The error is
that of fastnn's parameter update (new - old) against the float64 reference step.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import optim as fastnn_optim
from .. import testing
from .cases import Goal, Run, case

# GPT-2 small (124M parameters in 148 tensors), shapes as in Hugging Face's GPT2LMHeadModel.
_H, _L = 768, 12
GPT2_SMALL = [(50257, _H), (1024, _H)] + [
    s for _ in range(_L) for s in [
        (_H,), (_H,), (_H, 3 * _H), (3 * _H,), (_H, _H), (_H,), (_H,), (_H,), (_H, 4 * _H), (4 * _H,), (4 * _H, _H), (_H,)
    ]
] + [(_H,), (_H,)]
assert len(GPT2_SMALL) == 148

# The CPU case's model: 10.5M parameters in 60 tensors (ten 1024x1024 layers with biases and norms).
CPU_MODEL = [(1024, 1024)] * 10 + [(1024,)] * 20 + [(256,)] * 30


def _params(shapes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g).mul_(0.02).to(device=device, dtype=dtype))
        p.grad = torch.randn(s, generator=g).mul_(1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def _clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


def _size(shapes) -> str:
    """"12.3M params / 60 tensors": the shape column and the note say the same."""
    n = sum(torch.Size(s).numel() for s in shapes)
    return f"{n / 1e6:.1f}M params / {len(shapes)} tensors"


def _nbytes(params, *, states: int, grad_reads: int = 1) -> int:
    """Fewest bytes one AdamW step moves: read+write the parameter and each state, read the grad."""
    return sum(p.numel() * p.element_size() * (2 + 2 * states + grad_reads) for p in params)


def _adamw_run(shapes, dtype, device, *, clip: float | None = None, with_slow_baselines: bool = True) -> Run:
    params = _params(shapes, dtype, device)
    torch_params = _clone_params(params)
    torch_fused = torch.optim.AdamW(torch_params, lr=1e-3, weight_decay=0.01, fused=True)
    fast = fastnn_optim.AdamW(params, lr=1e-3, weight_decay=0.01, max_grad_norm=clip)
    torch_fused.step()  # state initialisation out of the timed region
    fast.step()

    if clip is None:
        baseline = torch_fused.step
        name = "torch AdamW(fused=True)"
    else:
        def baseline():
            torch.nn.utils.clip_grad_norm_(torch_params, clip)
            torch_fused.step()
        name = f"clip_grad_norm_({clip}) + torch AdamW(fused=True)"

    others = {}
    if with_slow_baselines and clip is None:
        for label, kw in (("torch AdamW(foreach=True)", dict(foreach=True)),
                          ("torch AdamW for-loop", dict(foreach=False))):
            o = torch.optim.AdamW(_clone_params(params), lr=1e-3, weight_decay=0.01, **kw)
            o.step()
            others[label] = o.step

    def error() -> float:
        return adamw_update_error(shapes, dtype, device, clip)

    states = 2
    nbytes = _nbytes(params, states=states)
    return Run(baseline=baseline, baseline_name=name, fastnn=fast.step, error=error, others=others, bytes=nbytes,
               note=f"{_size(shapes)}; GB/s counts {nbytes / 1e9:.2f} GB per step "
                    "(param, exp_avg, exp_avg_sq read+written, grad read)")


def adamw_update_error(shapes, dtype, device, clip: float | None = None, steps: int = 3) -> float:
    """Max relative error of fastnn AdamW's parameter updates over ``steps`` steps against the float64
    reference run from the same start (the update new - old, so the parameters' magnitude does not
    hide it). Uses a 1/16 slice of each tensor to stay cheap on big models."""
    small = [tuple(max(1, d // 4) for d in s) for s in shapes]
    params = _params(small, dtype, device, seed=1)
    start = [p.detach().double().cpu() for p in params]
    opt = fastnn_optim.AdamW(params, lr=1e-3, weight_decay=0.01, max_grad_norm=clip)
    p64 = [torch.nn.Parameter(s.clone()) for s in start]
    opt64 = torch.optim.AdamW(p64, lr=1e-3, weight_decay=0.01, foreach=False)
    for _ in range(steps):
        for p, q in zip(p64, params):  # clip_grad_norm_ scales in place: start each step from the grads
            p.grad = q.grad.double().cpu()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(p64, clip)
        opt.step()
        opt64.step()
    got = torch.cat([(p.detach().double().cpu() - s).flatten() for p, s in zip(params, start)])
    want = torch.cat([(p.detach() - s).flatten() for p, s in zip(p64, start)])
    return testing.max_rel_error(got, want)


SMOKE_MODEL = [(128, 128)] * 10 + [(3001,)] * 10

_H100 = "H100 fp32, GPT-2-small's 124M params in 148 tensors"


@case("optim", "adamw-gpt2-small", shape=_size(GPT2_SMALL), dtype=torch.float32, devices=("cuda",),
      goal=Goal(1.34 / 1.20, f"{_H100}: torch fused 1.34 ms; goal <= 1.20 ms, 1.05x the memory floor "
                             "(1.16 ms: bytes moved / 3.0 TB/s)"))
def _gpt2(device):
    return _adamw_run(GPT2_SMALL, torch.float32, device)


@case("optim", "adamw-gpt2-small-clip", shape=_size(GPT2_SMALL), dtype=torch.float32, devices=("cuda",),
      goal=Goal(1.97 / 1.40, f"{_H100}: clip_grad_norm_(1.0) + torch fused 1.97 ms; goal <= 1.40 ms "
                             "with the clipping fused into the step"))
def _gpt2_clip(device):
    return _adamw_run(GPT2_SMALL, torch.float32, device, clip=1.0)


@case("optim", "adamw-gpt2-small-bf16", shape=_size(GPT2_SMALL), dtype=torch.bfloat16, devices=("cuda",),
      goal=Goal(0.83 / 0.75, "H100, GPT-2-small in bf16: torch fused 0.83 ms; goal <= 0.75 ms"))
def _gpt2_bf16(device):
    return _adamw_run(GPT2_SMALL, torch.bfloat16, device, with_slow_baselines=False)


@case("optim", "adamw-2000x4096", shape="2000 tensors x 4096", dtype=torch.float32, devices=("cuda",),
      goal=Goal(20.0, "H100, 8.2M fp32 params in 2000 tensors: torch fused 6.92 ms; goal <= 0.35 ms "
                      "(one launch, no per-step host work)"))
def _many_small(device):
    return _adamw_run([(4096,)] * 2000, torch.float32, device)


@case("optim", "adamw-10.5M-60t", shape=_size(CPU_MODEL), dtype=torch.float32, devices=("cpu",),
      goal=Goal(1.0, "2-core CPU, 2 threads: torch fused 13.8 ms (foreach 50 ms, for-loop 44 ms); "
                     "goal: no slower than torch fused"))
def _cpu_model(device):
    return _adamw_run(CPU_MODEL, torch.float32, device)


@case("optim", "adamw-small-smoke", shape=_size(SMOKE_MODEL), dtype=torch.float32, devices=("cpu", "cuda"),
      quick=True)
def _smoke(device):
    return _adamw_run(SMOKE_MODEL, torch.float32, device, with_slow_baselines=False)
