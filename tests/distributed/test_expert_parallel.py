"""fastnn.distributed.ExpertParallelMoE with 2 and 4 gloo processes on the CPU: outputs, input
gradients and parameter gradients equal to the single-process layer on the same tokens."""

import pytest
import torch
import torch.distributed as dist

import fastnn
from fastnn import testing
from fastnn.distributed import ExpertParallelMoE
from tests.distributed._spawn import run_on_ranks

CONFIGS = {
    "mixtral": dict(num_experts=8, top_k=2),
    "capacity_shared": dict(num_experts=8, top_k=2, capacity_factor=0.75, shared_expert_size=6, aux_loss_coef=0.1),
    "deepseek": dict(num_experts=8, top_k=3, score_func="sigmoid", num_groups=4, topk_groups=2,
                     group_score="top2_sum", selection_bias=True),
}


def _run_all_configs(rank, world):
    for config in CONFIGS:  # one process group for every config: starting processes is the cost
        _check(rank, world, config)
    _check_whole_model_norm(rank, world)


def _check_whole_model_norm(rank, world):
    """fastnn.optim's max_grad_norm over an ExpertParallelMoE: each rank's experts are its own, so
    their squares are summed over the group; the replicated router and shared expert count once."""
    torch.manual_seed(0)
    ep = ExpertParallelMoE(fastnn.MoE(10, 7, dtype=torch.float64, shared_expert_size=6, **CONFIGS["mixtral"]))
    x = torch.randn(world, 9, 10, dtype=torch.float64)[rank]
    (ep(x).square().sum() * 100).backward()
    experts = sum(p.grad.square().sum() for p in ep.expert_parameters())
    dist.all_reduce(experts)
    others = sum(p.grad.square().sum() for n, p in ep.named_parameters()
                 if all(p is not e for e in ep.expert_parameters()))
    opt = fastnn.optim.AdamW(ep.parameters(), lr=1e-3, max_grad_norm=1e-3)
    opt.step()
    testing.assert_close(opt.last_grad_norm.double(), (experts + others).sqrt(), msg="whole-model norm")


def _check(rank, world, config):
    torch.manual_seed(0)  # every rank builds the same full layer and the same global batch
    full = fastnn.MoE(10, 7, dtype=torch.float64, **CONFIGS[config])
    xs = torch.randn(world, 9, 10, dtype=torch.float64)
    if world == 4:
        xs[0] = 0  # rank 0's tokens are all alike: uneven all-to-all splits
    ep = ExpertParallelMoE(full, group=None)
    x = xs[rank].clone().requires_grad_()
    y = ep(x)
    (y.square().sum() + (ep.aux_loss if ep.aux_loss is not None else 0)).backward()
    # Single process: the full layer on every rank's tokens (routing, capacity and the aux loss
    # are per batch, and each rank's batch is its own chunk).
    xf = xs.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    outs = []
    for r in range(world):
        outs.append(full(xf[r]))
        total = total + outs[-1].square().sum() + (full.aux_loss if full.aux_loss_coef else 0)
    total.backward()
    yf = torch.stack(outs)
    testing.assert_close(y, yf[rank].detach(), msg=f"{config}: output")
    testing.assert_close(x.grad, xf.grad[rank], msg=f"{config}: input grad")
    sl = slice(ep.first_expert, ep.first_expert + ep.local_experts)
    testing.assert_close(ep.gate_up_proj.grad, full.experts.gate_up_proj.grad[sl], msg=f"{config}: gate_up_proj grad")
    testing.assert_close(ep.down_proj.grad, full.experts.down_proj.grad[sl], msg=f"{config}: down_proj grad")
    router = ep.gate.weight.grad.clone()
    dist.all_reduce(router)  # replicated router: the ranks' gradients add up to the full one
    testing.assert_close(router, full.gate.weight.grad, msg=f"{config}: router grad")
    dist.barrier()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_single_process(world):
    run_on_ranks(_run_all_configs, world)


def test_needs_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(fastnn.MoE(4, 4, 2, 1))
