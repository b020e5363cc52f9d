"""Mixture-of-Experts benchmark cases.

Baselines are the two implementations a user has today: the Hugging Face eager loop over experts
("HF loop") and the best a user composes from PyTorch ("torch grouped": softmax/top-k/argsort/index_select +
``torch._grouped_mm`` + SiLU*up + index_add), when this torch has ``_grouped_mm`` for the dtype.
Routing is uniform (random router) or skewed: a Zipf-like bias on the router logits, carried by a
constant input feature so that every implementation routes the same tokens the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..nn.moe import MoE
from ..reference import moe as ref
from ..testing import max_rel_error
from .cases import Goal, Run, case

Tensor = torch.Tensor


class _Problem:
    """One MoE layer's weights and tokens, shared by every implementation of a case."""

    def __init__(self, device, T, H, I, E, k, dtype, zipf=False, **routing):
        g = torch.Generator(device=device).manual_seed(0)  # generated where used: experts are GBs
        self.T, self.H, self.I, self.E, self.k = T, H, I, E, k
        self.layer = MoE(H, I, E, k, device=device, dtype=dtype, **routing)
        self.routing = {n: v for n, v in self.layer.routing.items() if n in routing}
        x = torch.randn(T, H, generator=g, device=device) * 0.5
        with torch.no_grad():
            for p in (self.layer.gate.weight, self.layer.experts.gate_up_proj, self.layer.experts.down_proj):
                p.copy_(torch.randn(p.shape, generator=g, device=device) * p.shape[-1] ** -0.5)
            if zipf:  # logit bias -1.2 * log(rank) on expert e: routing ~ Zipf(1.2) over the experts
                x[:, 0] = 1.0
                self.layer.gate.weight[:, 0] = -1.2 * torch.log(torch.arange(1, E + 1, device=device,
                                                                             dtype=torch.float32))
        self.x = x.to(dtype=dtype)
        self.wg = self.layer.gate.weight.detach()
        self.w1 = self.layer.experts.gate_up_proj.detach()
        self.w2 = self.layer.experts.down_proj.detach()
        self.flops = 2 * T * k * (H * 2 * I + I * H)

    def gate(self):
        logits = self.x @ self.wg.t()
        if self.routing:  # DeepSeek-style routing composed from torch ops (the reference)
            r = ref.topk_gating(logits, self.k, selection_bias=self.layer.e_score_correction_bias, **self.routing)
            return r.weights, r.expert_ids
        p = logits.float().softmax(-1)
        w, idx = p.topk(self.k, dim=-1)
        return w / w.sum(-1, keepdim=True), idx

    def gate_permute(self):
        w, idx = self.gate()
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.E)
        return self.x.index_select(0, order // self.k), order, counts, w

    def hf_loop(self, x=None, w1=None, w2=None):
        x = self.x if x is None else x
        w1 = self.w1 if w1 is None else w1
        w2 = self.w2 if w2 is None else w2
        w, idx = self.gate()
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.E).permute(2, 1, 0)
        for e in range(self.E):
            j, tok = torch.where(mask[e])
            h = x[tok] @ w1[e].t()
            a, u = h.chunk(2, -1)
            y = (F.silu(a) * u) @ w2[e].t()
            out.index_add_(0, tok, (y * w[tok, j, None]).to(x.dtype))
        return out

    def torch_grouped(self, x=None, w1=None, w2=None):
        x = self.x if x is None else x
        w1 = self.w1 if w1 is None else w1
        w2 = self.w2 if w2 is None else w2
        w, idx = self.gate()
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        offs = torch.bincount(flat, minlength=self.E).cumsum(0).to(torch.int32)
        xs = x.index_select(0, order // self.k)
        h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
        a, u = h.chunk(2, -1)
        y = torch._grouped_mm((F.silu(a) * u).contiguous(), w2.transpose(1, 2), offs=offs)
        out = torch.zeros_like(x)
        return out.index_add(0, order // self.k, (y * w.flatten()[order][:, None]).to(x.dtype))

    def grouped_available(self) -> bool:
        if not hasattr(torch, "_grouped_mm"):
            return False
        try:
            self.torch_grouped()
            return True
        except (RuntimeError, NotImplementedError):  # dtype/device/arch without a grouped GEMM
            return False

    @torch.no_grad()
    def error(self) -> float:
        exact = self.hf_loop(self.x.float(), self.w1.float(), self.w2.float())
        return max_rel_error(self.layer(self.x), exact)


def _layer_case(device, fwd_bwd, **shape) -> Run:
    """fastnn.MoE against the HF loop and, on CUDA, the composed torch path ("torch grouped"), which
    is then the baseline (the GPU goals are ratios against it) with the HF loop beside it."""
    pb = _Problem(device, **shape)
    for p in (pb.w1, pb.w2):
        p.requires_grad_(False)
    if fwd_bwd:
        w1, w2 = pb.w1.clone().requires_grad_(), pb.w2.clone().requires_grad_()

        def train(fn):
            def run():
                x = pb.x.detach().requires_grad_()
                out = fn(x)
                out.backward(torch.ones_like(out))
            return run
        fast = train(pb.layer)
        impls = {"HF loop fwd+bwd": train(lambda x: pb.hf_loop(x, w1, w2)),
                 "torch grouped fwd+bwd": train(lambda x: pb.torch_grouped(x, w1, w2))}
        flops = 3 * pb.flops
    else:
        def fast():
            with torch.no_grad():
                return pb.layer(pb.x)
        impls = {"HF loop": pb.hf_loop, "torch grouped": pb.torch_grouped}
        flops = pb.flops
    grouped = [k for k in impls if k.startswith("torch grouped")][0]
    if device.type != "cuda" or not pb.grouped_available():
        del impls[grouped]
    name = grouped if grouped in impls else next(iter(impls))
    baseline = impls.pop(name)
    fallback = device.type == "cuda" and name != grouped
    note = "torch._grouped_mm unavailable here: the baseline is the HF loop, the goal ratio does not apply" \
        if fallback else ""
    return Run(baseline=baseline, baseline_name=name, fastnn=fast, error=pb.error, others=impls, flops=flops,
               note=note, goal_applies=not fallback)


# -- CPU (measurable on the development machine) ----------------------------------------------

@case("moe", "layer_cpu_T512", shape="T=512 H=512 I=1024 E=8 k=2", dtype=torch.float32, devices=("cpu",),
      goal=Goal(2.0, "2-core CPU, fp32: HF loop 86 ms (torch gate alone 0.24 ms); goal: MoE layer >= 2x the HF loop"),
      quick=True)
def _cpu_layer(device):
    return _layer_case(device, False, T=512, H=512, I=1024, E=8, k=2, dtype=torch.float32)


@case("moe", "layer_cpu_T512_fwd_bwd", shape="T=512 H=512 I=1024 E=8 k=2", dtype=torch.float32, devices=("cpu",),
      goal=Goal(1.0, "training: no slower than the HF loop"))
def _cpu_layer_train(device):
    return _layer_case(device, True, T=512, H=512, I=1024, E=8, k=2, dtype=torch.float32)


@case("moe", "gating_permute_cpu_T512", shape="T=512 E=8 k=2", dtype=torch.float32, devices=("cpu",))
def _cpu_gating(device):
    return _gating_case(device, T=512, H=512, I=1024, E=8, k=2, dtype=torch.float32)


# -- GPU (bf16; goals from torch grouped's time on an H100) ---------------------------------------

SHAPES = {
    "mixtral": dict(T=4096, H=4096, I=14336, E=8, k=2),
    "olmoe": dict(T=8192, H=2048, I=1024, E=64, k=8),
    "qwen3_30b": dict(T=8192, H=2048, I=768, E=128, k=8),
    "small": dict(T=512, H=1024, I=2816, E=8, k=2),
    # DeepSeek-V3's routing (sigmoid, 8 groups, top-4 groups, k=8 of E=256) at a reduced width:
    # the real H=7168, I=2048 experts alone would take 22 GB.
    "deepseek_v3": dict(T=4096, H=2048, I=512, E=256, k=8),
}
DEEPSEEK_ROUTING = dict(score_func="sigmoid", num_groups=8, topk_groups=4, group_score="top2_sum",
                        routed_scaling_factor=2.5, selection_bias=True)
_GROUPED = "H100 bf16: torch grouped"
GOALS = {  # the forward goals, as speedups over torch grouped
    "mixtral": Goal(6.24 / 4.6, f"{_GROUPED} 6.24 ms (463 TFLOP/s, HF loop 6.55 ms); goal <= 4.6 ms (>= 600 TFLOP/s)"),
    "olmoe": Goal(4.20 / 2.0, f"{_GROUPED} 4.20 ms (HF loop 23.2 ms); goal <= 2.0 ms"),
    "qwen3_30b": Goal(2.0, f"{_GROUPED} 3.97 ms (HF loop 46.5 ms); goal >= 2x, <= 1.8 ms"),
    "small": Goal(0.87 / 0.25, f"{_GROUPED} 0.87 ms (HF loop 3.15 ms); goal <= 0.25 ms"),
    "deepseek_v3": None,
}
TRAIN_GOALS = {"mixtral": Goal(19.9 / 15, f"{_GROUPED} fwd+bwd 19.9 ms (435 TFLOP/s); goal <= 15 ms"),
               "qwen3_30b": Goal(2.0, f"{_GROUPED} fwd+bwd 11.6 ms; goal >= 2x, <= 5.8 ms")}


def _shape_str(s):
    return f"T={s['T']} H={s['H']} I={s['I']} E={s['E']} k={s['k']}"


def _routing_for(name):
    return DEEPSEEK_ROUTING if name == "deepseek_v3" else {}


for _name, _shape in SHAPES.items():
    for _zipf in (False, True):
        _suffix = "_zipf" if _zipf else ""
        # Zipf routing has no goal: it shows how skew changes the picture against the uniform case.
        _goal = GOALS[_name] if not _zipf else None

        def _fwd(device, _s=_shape, _z=_zipf, _n=_name):
            return _layer_case(device, False, dtype=torch.bfloat16, zipf=_z, **_s, **_routing_for(_n))

        def _train(device, _s=_shape, _z=_zipf, _n=_name):
            return _layer_case(device, True, dtype=torch.bfloat16, zipf=_z, **_s, **_routing_for(_n))

        case("moe", f"layer_{_name}{_suffix}", shape=_shape_str(_shape), dtype=torch.bfloat16, devices=("cuda",),
             goal=_goal, quick=_name == "small" and not _zipf)(_fwd)
        case("moe", f"layer_{_name}{_suffix}_fwd_bwd", shape=_shape_str(_shape), dtype=torch.bfloat16,
             devices=("cuda",), goal=TRAIN_GOALS.get(_name) if not _zipf else None)(_train)


def _gating_case(device, **shape) -> Run:
    pb = _Problem(device, **shape)
    logits = (pb.x @ pb.wg.t())

    def fast():
        g = ops.topk_gating(logits, pb.k)
        return ops.permute_tokens(pb.x, g.sorted_slots, pb.k)

    def baseline():
        return pb.gate_permute()

    def error():
        # Both list a token's experts best first; a different choice counts as an infinite error.
        g = ops.topk_gating(logits, pb.k)
        w, idx = pb.gate()
        return max_rel_error(g.weights, w) if torch.equal(g.expert_ids, idx) else float("inf")

    # bytes: read x and logits, write the permuted rows and the routing metadata
    nbytes = pb.x.numel() * pb.x.element_size() * (1 + pb.k) + logits.numel() * logits.element_size()
    return Run(baseline=baseline, baseline_name="torch gate+permute", fastnn=fast, error=error, bytes=nbytes,
               others={"torch gate": pb.gate})


for _name in ("mixtral", "olmoe", "qwen3_30b", "small"):
    case("moe", f"gating_permute_{_name}", shape=_shape_str(SHAPES[_name]), dtype=torch.bfloat16, devices=("cuda",),
         goal=Goal(10.0, "H100 bf16: torch gate+permute 0.44-0.55 ms on every shape; goal <= 0.05 ms"))(
        lambda device, _s=SHAPES[_name]: _gating_case(device, dtype=torch.bfloat16, **_s))


def _grouped_gemm_case(device, **shape) -> Run:
    """The up projection alone: fastnn's grouped GEMM against one dense GEMM of the same FLOPs."""
    pb = _Problem(device, **shape)
    g = ops.topk_gating(pb.x @ pb.wg.t(), pb.k)
    xs = ops.permute_tokens(pb.x, g.sorted_slots, pb.k)
    offsets = torch.cumsum(g.tokens_per_expert, 0)
    dense_a = torch.randn_like(xs)
    dense_b = pb.w1[0]
    others = {}
    if hasattr(torch, "_grouped_mm"):
        offs32 = offsets.to(torch.int32)
        w1t = pb.w1.transpose(1, 2)
        try:
            torch._grouped_mm(xs, w1t, offs=offs32)
            others["torch._grouped_mm"] = lambda: torch._grouped_mm(xs, w1t, offs=offs32)
        except (RuntimeError, NotImplementedError):
            pass

    def error():
        got = ops.grouped_mm(xs, pb.w1, offsets, trans_b=True)
        starts = [0] + offsets.tolist()[:-1]
        bounds = zip(starts, offsets.tolist())
        want = torch.cat([xs[s:e].float() @ pb.w1[i].float().t() for i, (s, e) in enumerate(bounds)])
        return max_rel_error(got, want)

    return Run(baseline=lambda: dense_a @ dense_b.t(), baseline_name="dense GEMM, same FLOPs",
               fastnn=lambda: ops.grouped_mm(xs, pb.w1, offsets, trans_b=True), error=error, others=others,
               flops=2 * pb.T * pb.k * pb.H * 2 * pb.I,
               note="speedup = grouped / dense throughput")


_DENSE = {"mixtral": "603 vs 697", "qwen3_30b": "516 vs 684"}
for _name in ("mixtral", "qwen3_30b"):
    case("moe", f"grouped_gemm_up_{_name}", shape=_shape_str(SHAPES[_name]), dtype=torch.bfloat16, devices=("cuda",),
         goal=Goal(0.9, f"H100 bf16 up projection: torch._grouped_mm against one dense GEMM of the same FLOPs, "
                        f"{_DENSE[_name]} TFLOP/s; goal >= 90% of the dense GEMM"))(
        lambda device, _s=SHAPES[_name]: _grouped_gemm_case(device, dtype=torch.bfloat16, **_s))
