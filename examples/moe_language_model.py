"""A small byte-level transformer language model with fastnn MoE feed-forward layers, trained with
fastnn.optim.AdamW on the Python standard library's own source (text every machine has).

The same model is trained twice from the same initialisation: once with ``fastnn.MoE`` and once
with the Hugging Face-style per-expert loop (same parameters, same routing), and the script
reports loss, tokens per second and expert utilisation for both, and how far apart their loss
curves are (they start equal; rounding differences may later pick different experts).

    python examples/moe_language_model.py --quick               # smoke test, about a minute on 2 cores
    python examples/moe_language_model.py --steps 60            # CPU, about a minute or two
    python examples/moe_language_model.py --device cuda --steps 300 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastnn
from fastnn.optim import AdamW


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, so every machine gets the same text)."""
    root = os.path.dirname(os.__file__)
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class LoopMoE(nn.Module):
    """The Hugging Face eager MoE block's algorithm (softmax, top-k, renormalise, loop over experts)
    over a fastnn.MoE's parameters."""

    def __init__(self, moe: fastnn.MoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        h = x.reshape(-1, m.hidden_size)
        logits = F.linear(h, m.gate.weight)
        probs = logits.float().softmax(-1)
        w, idx = probs.topk(m.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True)).to(h.dtype)
        out = torch.zeros_like(h)
        mask = F.one_hot(idx, m.num_experts).permute(2, 1, 0)
        for e in range(m.num_experts):
            j, tok = torch.where(mask[e])
            gate, up = F.linear(h[tok], m.experts.gate_up_proj[e]).chunk(2, -1)
            y = F.linear(F.silu(gate) * up, m.experts.down_proj[e])
            out = out.index_add(0, tok, y * w[tok, j, None])
        # Statistics in the same place as fastnn.MoE's, for the report.
        m.router_stats = {"tokens_per_expert": torch.bincount(idx.flatten(), minlength=m.num_experts)}
        m.aux_loss = m.aux_loss_coef * fastnn.ops.load_balancing_loss(logits, m.router_stats["tokens_per_expert"])
        return out.reshape(x.shape)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, ffn: nn.Module) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.ffn(self.ln2(x))


class MoELM(nn.Module):
    def __init__(self, d=128, layers=2, heads=4, experts=8, top_k=2, ffn=256, ctx=128, loop=False) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.moes = [fastnn.MoE(d, ffn, experts, top_k, aux_loss_coef=0.01) for _ in range(layers)]
        self.blocks = nn.ModuleList(Block(d, heads, LoopMoE(m) if loop else m) for m in self.moes)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))

    def aux_loss(self) -> torch.Tensor:
        return sum(m.aux_loss for m in self.moes)


def train(impl: str, data: torch.Tensor, args, device, dtype) -> dict:
    """Train one model; prints progress every ``args.log_every`` steps."""
    torch.manual_seed(0)
    model = MoELM(loop=impl == "hf_loop", ctx=args.ctx).to(device=device, dtype=dtype)
    opt = AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    n_train = int(len(data) * 0.9)
    tokens, seconds, losses = 0, 0.0, []
    load = torch.zeros(model.moes[0].num_experts)
    for step in range(args.steps):
        starts = torch.randint(0, n_train - args.ctx - 1, (args.batch,), generator=g)
        batch = torch.stack([data[s:s + args.ctx + 1] for s in starts]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, 256), batch[:, 1:].reshape(-1))
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:  # skip warm-up steps (allocations, autotuning) in the throughput
            seconds += time.perf_counter() - t0
            tokens += batch[:, :-1].numel()
        losses.append(float(loss.detach()))
        load += sum(m.router_stats["tokens_per_expert"].float().cpu() for m in model.moes)
        if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            rate = f"{tokens / seconds:,.0f} tokens/s" if seconds else "warming up"
            print(f"  {impl:8s} step {step + 1:4d}/{args.steps}  loss {losses[-1]:.3f}  {rate}", flush=True)
    share = load / load.sum()
    return {"impl": impl, "model": model, "losses": losses, "first_loss": losses[0],
            "final_loss": sum(losses[-5:]) / len(losses[-5:]), "val_loss": val_loss(model, data, args.ctx),
            "tokens_per_s": tokens / max(seconds, 1e-9), "expert_share": share.tolist(),
            "utilisation_entropy": float(-(share * share.clamp_min(1e-12).log()).sum() / math.log(len(share)))}


def val_batch(data: torch.Tensor, ctx: int) -> torch.Tensor:
    """Up to 64 held-out sequences from the last 10% of the text."""
    starts = torch.arange(int(len(data) * 0.9), len(data) - ctx - 1, ctx)[:64]
    return torch.stack([data[s:s + ctx + 1] for s in starts])


@torch.no_grad()
def val_loss(model: nn.Module, data: torch.Tensor, ctx: int) -> float:
    batch = val_batch(data, ctx).to(model.emb.weight.device)
    return float(F.cross_entropy(model(batch[:, :-1]).float().reshape(-1, 256), batch[:, 1:].reshape(-1)))


QUICK = dict(steps=20, batch=8, ctx=64, data_bytes=300_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per model (default: 60)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--ctx", type=int, default=128, help="sequence length in bytes (default: 128)")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default: 2e-3)")
    p.add_argument("--device", default="cpu", help="where to train: cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and activation dtype (default: float32)")
    p.add_argument("--impl", default="both", choices=["both", "fastnn", "hf_loop"],
                   help="train with fastnn.MoE, the Hugging Face-style loop over experts, or both (default)")
    p.add_argument("--data-bytes", type=int, default=4_000_000,
                   help="bytes of standard-library source to train on (default: 4000000)")
    p.add_argument("--log-every", type=int, default=None, metavar="N",
                   help="print the loss every N steps (default: ten times per run; 0: never)")
    p.add_argument("--quantize", action="store_true",
                   help="after training, compare the fastnn model (on the CPU, fp32) with its int8 dynamic version "
                        "(fastnn.quantize_dynamic: every layer type it supports): validation loss, state_dict "
                        "bytes, latency of one sequence")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.log_every is None:
        args.log_every = max(1, args.steps // 10)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Train the implementations that ``args.impl`` names and print the report; returns each one's
    results (``losses`` per step, ``val_loss``, ``tokens_per_s``, ``expert_share`` ...)."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = stdlib_bytes(args.data_bytes)
    print(f"data: {len(data) / 1e6:.1f} MB of standard-library source; device {device}, {dtype}, "
          f"{torch.get_num_threads()} threads; {args.steps} steps of {args.batch} x {args.ctx} bytes")
    impls = ["fastnn", "hf_loop"] if args.impl == "both" else [args.impl]
    results = [train(i, data, args, device, dtype) for i in impls]
    for r in results:
        share = " ".join(f"{s:.2f}" for s in r["expert_share"])
        print(f"{r['impl']:8s} loss {r['first_loss']:.3f} -> {r['final_loss']:.3f} (val {r['val_loss']:.3f})  "
              f"{r['tokens_per_s']:,.0f} tokens/s  expert share [{share}] "
              f"(normalised entropy {r['utilisation_entropy']:.3f})")
    if len(results) == 2:
        gap = max(abs(a - b) for a, b in zip(results[0]["losses"], results[1]["losses"]))
        print(f"largest loss difference between fastnn and the HF loop: {gap:.2e}")
        print(f"fastnn / HF loop throughput: {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    if args.quantize:
        results[0]["quantized"] = quantized_report(results[0]["model"], data, args.ctx)
    return results


def quantized_report(model: nn.Module, data: torch.Tensor, ctx: int) -> dict:
    """The trained model (a CPU fp32 copy: the int8 kernels run on the CPU) against its int8 dynamic
    version; prints which layers were quantized."""
    import copy

    from fastnn.quantized.report import compare

    model = copy.deepcopy(model).cpu().float()
    qmodel = fastnn.quantize_dynamic(model)
    swapped = sorted({type(m).__name__ for m in qmodel.modules() if type(m).__module__.startswith("fastnn.quantized")})
    print(f"quantized layer types: {', '.join(swapped) or 'none'} (the rest stays fp32)")
    return compare(model, lambda m: val_loss(m, data, ctx), (val_batch(data, ctx)[:1, :-1],), qmodel=qmodel,
                   metric="val loss", sample_name=f"one {ctx}-byte sequence (batch 1)")


def main(argv: list[str] | None = None) -> int:
    results = run(parse_args(argv))
    finite = all(math.isfinite(v) for r in results for v in r["losses"] + [r["val_loss"]])
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
