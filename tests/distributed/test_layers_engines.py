"""fastnn.LSTM / GRU / RNN (stacked, bidirectional) and fastnn.MoE under FSDP2 (``fully_shard`` per
layer, per block, and the root only) and DistributedDataParallel, gloo on the CPU with 2 and 4
processes: outputs, input gradients, the reduced parameter gradients and the parameters after an
Adam step equal a single process on the same global batch. Frozen parameters and
``find_unused_parameters`` behave as with the same model built from torch.nn's layers.

One spawn per world size runs every check (starting processes is the cost)."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import fastnn
from fastnn.distributed import ExpertParallelMoE
from tests.distributed import _layers as L
from tests.distributed._spawn import run_on_ranks


def _shard(model, how):
    if how == "layer":
        top = [model.top.moe, model.top.head] if isinstance(model.top, L.MoEBlock) else [model.top]
        for m in [model.rec.lstm, model.rec.gru, model.rec.rnn] + top:
            fully_shard(m, **L.shard_kwargs())
    elif how == "block":
        fully_shard(model.rec, **L.shard_kwargs())
        fully_shard(model.top, **L.shard_kwargs())
    fully_shard(model, **L.shard_kwargs())
    return model


def check_fsdp(rank, world, modes=("layer", "block", "root")):
    xs = L.global_batch(world)
    want = L.single_process(L.build(), xs)
    for how in modes:
        got = L.data_parallel(_shard(L.build(), how), xs, rank, world)
        L.assert_matches(got, want, rank, world, f"fully_shard per {how}")


def check_ddp(rank, world):
    xs = L.global_batch(world)
    want = L.single_process(L.build(), xs)
    model = DDP(L.build(), **L.ddp_kwargs())
    L.assert_matches(L.data_parallel(model, xs, rank, world, inner=model.module), want, rank, world, "DDP")


def _twins(frozen):
    """The recurrent model built from torch.nn's layers and from fastnn's, with the same weights."""
    ref = L.build(nn, moe=False, frozen=frozen)
    fast = L.build(moe=False, frozen=frozen)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def check_frozen(rank, world):
    """A frozen GRU and LSTM input weight: no gradient, unchanged by the step, under DDP and FSDP2,
    as with torch's layers."""
    xs = L.global_batch(world)
    ref, _ = _twins(True)
    want = L.single_process(copy.deepcopy(ref), xs)
    for lib in ("torch", "fastnn"):
        for engine in ("ddp", "fsdp"):
            model = _twins(True)[0 if lib == "torch" else 1]
            wrapped = DDP(model, **L.ddp_kwargs()) if engine == "ddp" else _shard(model, "layer")
            got = L.data_parallel(wrapped, xs, rank, world, inner=model)
            # the oracle's frozen parameters have no gradient: assert_matches checks these have none
            L.assert_matches(got, want, rank, world, f"{lib} layers, frozen, {engine}")


def check_find_unused(rank, world):
    """The GRU sits out the second step: with find_unused_parameters=True DDP trains as a single
    process does (the GRU gets no gradient that step); without it DDP raises at the next forward,
    the same error as with torch's layers."""
    xs = L.global_batch(world)
    ref, _ = _twins(False)
    want = L.single_process(copy.deepcopy(ref), xs, steps=2, skip_gru=(1,))
    errors = {}
    for lib, model in zip(("torch", "fastnn"), _twins(False)):
        ddp = DDP(model, find_unused_parameters=True, **L.ddp_kwargs())
        got = L.data_parallel(ddp, xs, rank, world, steps=2, skip_gru=(1,), inner=model)
        L.assert_matches(got, want, rank, world, f"{lib} layers, find_unused_parameters=True")
        ddp = DDP(_twins(False)[0 if lib == "torch" else 1], **L.ddp_kwargs())
        with pytest.raises(RuntimeError) as e:
            L.data_parallel(ddp, xs, rank, world, steps=3, skip_gru=(1,), inner=ddp.module)
        errors[lib] = str(e.value).split("\n")[0]
    assert errors["fastnn"] == errors["torch"], errors
    assert "find_unused_parameters" in str(e.value)
    dist.barrier(group=L.CTX["group"])


class _EPNet(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.inp = nn.Linear(10, 10)
        self.moe = moe
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        return self.out(self.moe(torch.tanh(self.inp(x))))


def _ep_nets(world):
    torch.manual_seed(0)
    moe = fastnn.MoE(10, 7, num_experts=8, top_k=2, shared_expert_size=6, shared_expert_gate=True)
    full = _EPNet(moe).to(L.CTX["device"], torch.float64)
    ep = copy.deepcopy(full)
    ep.moe = ExpertParallelMoE(full.moe, group=L.CTX["group"])
    return full, ep


def check_expert_parallel_fsdp(rank, world):
    """ExpertParallelMoE inside a model under FSDP2, which shards the router, the shared expert and
    the surrounding layers and leaves the experts to the layer: equal to the single-process MoE."""
    full, ep = _ep_nets(world)
    experts = set(ep.moe.expert_parameters())
    for m in (ep.inp, ep.moe.gate, ep.moe.shared_expert):
        fully_shard(m, **L.shard_kwargs())
    fully_shard(ep, ignored_params=experts, **L.shard_kwargs())
    xs = torch.randn(world * L.B, L.T, 10, dtype=torch.float64).to(L.CTX["device"])
    want = L.single_process(full, xs)
    opt = torch.optim.Adam(ep.parameters(), lr=1e-2)
    x = xs[rank * L.B:(rank + 1) * L.B].clone().requires_grad_()
    y = ep(x)
    L.loss_fn(y).backward()
    for p in experts:  # sum of the ranks' losses -> their mean, as FSDP2 reduces the rest
        p.grad.div_(world)
    grads = {n: L.full(p.grad).clone() for n, p in ep.named_parameters()}
    opt.step()
    sl = slice(ep.moe.first_expert, ep.moe.first_expert + ep.moe.local_experts)
    rename = {"moe.gate_up_proj": "moe.experts.gate_up_proj", "moe.down_proj": "moe.experts.down_proj"}
    w_grads = {n: (g[sl] if n.startswith("moe.experts.") else g) for n, g in want[2].items()}
    w_params = {n: (p[sl] if n.startswith("moe.experts.") else p) for n, p in want[3].items()}
    got = ([y.detach()], x.grad, {rename.get(n, n): g for n, g in grads.items()},
           {rename.get(n, n): L.full(p.detach()) for n, p in ep.named_parameters()})
    L.assert_matches(got, (want[0], want[1], w_grads, w_params), rank, world, "ExpertParallelMoE + fully_shard")
    # Sharding the experts themselves: a clear error, not a silent mix of the ranks' experts.
    with pytest.raises(ValueError, match="ignored_params"):
        fully_shard(_ep_nets(world)[1], **L.shard_kwargs())


def check_dtensor_parameters(rank, world):
    """Recurrent layers whose parameters DTensor's distribute_module replaced (tensor-parallel
    style, registered without setattr): fastnn's layers use them, as torch's do; neither layer
    has sharding rules for its recurrence, so both refuse a mix of DTensor weights and a plain
    input with the same error rather than run on the tensors listed before."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import distribute_module

    mesh = L.CTX["mesh"] or DeviceMesh.from_group(dist.group.WORLD, "cpu")
    errors = {}
    for lib in (nn, fastnn):
        for cls in (lib.LSTM, lib.GRU, lib.RNN):
            layer = distribute_module(cls(3, 4, device=L.CTX["device"]), mesh)
            with pytest.raises(RuntimeError, match="DTensor") as e:
                layer(torch.randn(5, 2, 3, device=L.CTX["device"]))
            errors[lib.__name__, cls.__name__] = e.value
    assert {type(e) for e in errors.values()} == {RuntimeError}, errors


def _all(rank, world, backend="gloo"):
    if backend == "nccl":
        L.use_nccl(rank)
    check_dtensor_parameters(rank, world)
    check_expert_parallel_fsdp(rank, world)
    check_ddp(rank, world)
    if world > 2:  # the wrapping variants and the torch twins once (at 2): this machine's time
        check_fsdp(rank, world, modes=("layer",))
        return
    check_fsdp(rank, world)
    check_frozen(rank, world)
    check_find_unused(rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_layers_under_fsdp2_and_ddp_equal_single_process(world):
    run_on_ranks(_all, world, timeout=300)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs a GPU per rank (2 or more)")
def test_layers_under_fsdp2_and_ddp_nccl():
    run_on_ranks(_all, 2, args=("nccl",), timeout=300)


@pytest.mark.parametrize("cls", [fastnn.LSTM, fastnn.GRU, fastnn.RNN])
def test_parameters_replaced_without_setattr_are_used(cls):
    """torch.func.functional_call (and any engine that writes ``_parameters`` directly) swaps the
    parameters without setattr: the layer runs on the swapped ones, as torch's layers do."""
    torch.manual_seed(0)
    layer, other = cls(3, 4, num_layers=2, bidirectional=True), cls(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    got = torch.func.functional_call(layer, dict(other.named_parameters()), (x,))[0]
    torch.testing.assert_close(got, other(x)[0])
    for name, p in other.named_parameters():  # the direct write FSDP2 makes on a module without __setattr__
        layer._parameters[name] = p
    torch.testing.assert_close(layer(x)[0], other(x)[0])
