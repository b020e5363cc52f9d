"""fastnn.optim (Adam, AdamW, SGD) on DTensor parameters, against torch.optim on the same engine:
FSDP2 (`fully_shard`) trajectories, clipping by the whole model's norm, a model mixing DTensor and
plain parameters, a tensor-parallel placement, and distributed checkpoints that cross optimizers
(fastnn <-> torch.optim) and world sizes (saved at 2 processes, loaded at 1).

Starting processes is the cost here: one process group per world size runs every check."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import fastnn
from tests.distributed._spawn import run_on_ranks

TOL = dict(rtol=2e-5, atol=2e-6)
STEPS = 3

# (name, fastnn class, torch class, keyword arguments, max_grad_norm)
CASES = [
    ("adamw", fastnn.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), None),
    ("adamw_clip", fastnn.optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), 0.05),
    ("adam_amsgrad", fastnn.optim.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.01, amsgrad=True), None),
    ("sgd_momentum", fastnn.optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01), None),
    ("sgd_nesterov_clip", fastnn.optim.SGD, torch.optim.SGD,
     dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), 0.05),
]


def _mesh(world, device):
    if device == "cpu":
        return init_device_mesh("cpu", (world,))
    # NCCL for the mesh's collectives; the default gloo group keeps the launcher's coordination.
    torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return DeviceMesh.from_group(dist.new_group(backend="nccl"), "cuda")


def _mlp(seed, device):
    # 5 output rows: an uneven split, and an empty shard at 4 processes.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 5)).to(device)


def _fsdp(seed, mesh, device, plain=()):
    """The MLP with fully_shard on each Linear and on the root; the Linears at `plain` stay plain
    tensors (then the root is not sharded: it would take their parameters)."""
    model = _mlp(seed, device)
    for i in (0, 2, 4):
        if i not in plain:
            fully_shard(model[i], mesh=mesh)
    if not plain:
        fully_shard(model, mesh=mesh)
    return model


def _batch(step, rank, device, same=False):
    g = torch.Generator().manual_seed(1000 * step + (0 if same else rank))
    return torch.randn(6, 12, generator=g).to(device), torch.randn(6, 5, generator=g).to(device)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _loss_backward(model, step, rank, device, same=False):
    x, y = _batch(step, rank, device, same)
    nn.functional.mse_loss(model(x), y).backward()


def _assert_params_equal(a, b, msg):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(_full(p.detach()), _full(q.detach()), **TOL, msg=lambda m: f"{msg} {name}: {m}")


def _assert_state_equal(opt_a, opt_b, msg):
    for pa, pb in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys(), f"{msg}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sa:
            if isinstance(sb[key], DTensor):  # torch's DTensor state: fastnn keeps the same placement
                assert isinstance(sa[key], DTensor) and sa[key].placements == sb[key].placements, \
                    f"{msg}: state[{key!r}] is {type(sa[key]).__name__} {getattr(sa[key], 'placements', '')}"
            torch.testing.assert_close(_full(sa[key]).float().cpu(), _full(sb[key]).float().cpu(), **TOL,
                                       msg=lambda m: f"{msg}: state[{key!r}]: {m}")


def _check_trajectories(rank, world, mesh, device, cases=CASES):
    for name, fast_cls, torch_cls, kwargs, clip in cases:
        ours, ref = _fsdp(0, mesh, device), _fsdp(0, mesh, device)
        opt = fast_cls(ours.parameters(), **kwargs, max_grad_norm=clip)
        ref_opt = torch_cls(ref.parameters(), **kwargs)
        for step in range(STEPS):
            for model in (ours, ref):
                _loss_backward(model, step, rank, device)
            if clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
            opt.step()
            ref_opt.step()
            if clip is not None:
                torch.testing.assert_close(opt.last_grad_norm.cpu(), _full(norm).float().cpu(), **TOL,
                                           msg=lambda m: f"{name} world {world} step {step}: grad norm: {m}")
            opt.zero_grad()
            ref_opt.zero_grad()
        _assert_params_equal(ours, ref, f"{name} world {world}")
        _assert_state_equal(opt, ref_opt, f"{name} world {world}")


def _check_mixed(rank, world, mesh, device):
    """The middle Linear stays plain (its gradients averaged over the ranks by hand, as a
    data-parallel wrapper would): one fastnn step over the DTensor shards and the plain tensors,
    and the clip norm counts each plain gradient once."""
    clip = 0.05
    ours, ref = _fsdp(0, mesh, device, plain=(2,)), _fsdp(0, mesh, device, plain=(2,))
    assert not isinstance(ours[2].weight, DTensor) and isinstance(ours[0].weight, DTensor)
    opt = fastnn.optim.AdamW(ours.parameters(), lr=1e-2, max_grad_norm=clip)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)  # foreach cannot mix them
    for step in range(STEPS):
        for model in (ours, ref):
            _loss_backward(model, step, rank, device)
            for p in model[2].parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        # The reference norm: sharded gradients in full, plain ones once.
        total = sum(_full(p.grad).double().square().sum() for p in ref.parameters()).sqrt()
        coef = torch.clamp(clip / (total + 1e-6), max=1.0)
        for p in ref.parameters():
            p.grad.mul_(coef.to(p.grad.dtype))
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.double().cpu(), total.cpu(), **TOL)
        opt.zero_grad()
        ref_opt.zero_grad()
    _assert_params_equal(ours, ref, f"mixed world {world}")
    _assert_state_equal(opt, ref_opt, f"mixed world {world}")


def _tp(seed, mesh, device):
    # ColwiseParallel: weight and bias Shard(0); RowwiseParallel: weight Shard(1), bias Replicate.
    model = _mlp(seed, device)[:3]
    model[2] = nn.Linear(24, 5).to(device)
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _check_tensor_parallel(rank, world, mesh, device):
    clip = 0.05
    ours, ref = _tp(0, mesh, device), _tp(0, mesh, device)
    placements = {p.placements for p in ours.parameters()}
    assert (Shard(0),) in placements and (Shard(1),) in placements and (Replicate(),) in placements, placements
    opt = fastnn.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=clip)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        for model in (ours, ref):
            x, y = _batch(step, rank, device, same=True)  # tensor parallel: one batch for all ranks
            nn.functional.mse_loss(model(x), y).backward()
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        opt.step()
        ref_opt.step()
        torch.testing.assert_close(opt.last_grad_norm.cpu(), _full(norm).float().cpu(), **TOL)
        opt.zero_grad()
        ref_opt.zero_grad()
    _assert_params_equal(ours, ref, f"tensor parallel world {world}")
    _assert_state_equal(opt, ref_opt, f"tensor parallel world {world}")


def _trained(cls, mesh, device, rank, seed=0, steps=2):
    model = _fsdp(seed, mesh, device)
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        _loss_backward(model, step, rank, device)
        opt.step()
        opt.zero_grad()
    return model, opt


def _save(model, opt, path):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _load(model, opt, path):
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _check_checkpoints(rank, world, mesh, device, tmp):
    """fastnn -> torch.optim and torch.optim -> fastnn through DCP: the loaded pair then takes the
    same step as the pair that was saved. Rank 0 also writes the full tensors of the fastnn run,
    for the single-process load of the same checkpoint."""
    for saved_cls, loaded_cls in ((fastnn.optim.AdamW, torch.optim.AdamW), (torch.optim.AdamW, fastnn.optim.AdamW)):
        tag = f"{saved_cls.__module__.split('.')[0]}_to_{loaded_cls.__module__.split('.')[0]}"
        path = os.path.join(tmp, f"{tag}_{world}")
        model, opt = _trained(saved_cls, mesh, device, rank)
        _save(model, opt, path)
        other = _fsdp(7, mesh, device)  # other weights: the load must replace them
        other_opt = loaded_cls(other.parameters(), lr=1e-2, weight_decay=0.1)
        _load(other, other_opt, path)
        _assert_params_equal(other, model, f"{tag}: loaded parameters")
        _assert_state_equal(other_opt, opt, f"{tag}: loaded state")
        for m, o in ((model, opt), (other, other_opt)):
            _loss_backward(m, 5, rank, device)
            o.step()
        _assert_params_equal(other, model, f"{tag}: the step after loading")
        if saved_cls is fastnn.optim.AdamW:
            full = {"params": [_full(p.detach()).cpu() for p in model.parameters()],
                    "state": [{k: _full(v).cpu() for k, v in opt.state[p].items()} for p in model.parameters()]}
            # The full tensors of the checkpoint (before the step just taken): saved again.
            _save(model, opt, path + "_after")
            if rank == 0:
                torch.save(full, path + "_after_full.pt")


def _check_placement_error(rank, world, mesh, device):
    """A gradient whose placements differ from its parameter's is refused, naming it, and
    nothing is stepped."""
    model = _fsdp(0, mesh, device)
    opt = fastnn.optim.AdamW(model.parameters(), lr=1e-2)
    _loss_backward(model, 0, rank, device)
    before = [p.detach().to_local().clone() for p in model.parameters()]
    w = model[0].weight
    w.grad = DTensor.from_local(torch.ones_like(w.full_tensor()), mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"grad.*placements \(Shard\(dim=0\),\), got \(Replicate\(\),\)"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach().to_local(), b)


def _run_all(rank, world, device, tmp):
    """Every check at `world` processes; with a checkpoint folder `tmp` (the 2-process run) also
    the Python path, the placement error and the checkpoints."""
    mesh = _mesh(world, device)
    _check_trajectories(rank, world, mesh, device)
    _check_mixed(rank, world, mesh, device)
    _check_tensor_parallel(rank, world, mesh, device)
    if tmp is not None:
        # The Python path (reference backend) over the same local shards.
        with fastnn.backends.force("reference", ["adam_step", "sgd_step", "grad_norm_clip_coef"]):
            _check_trajectories(rank, world, mesh, device, [c for c in CASES if c[4] is not None])
        _check_placement_error(rank, world, mesh, device)
        _check_checkpoints(rank, world, mesh, device, tmp)


def _load_single_process(tmp, world):
    """The checkpoint of `world` processes, loaded by one process into a plain model (DCP
    reshards): fastnn and torch.optim load the same state and then take the same step."""
    path = os.path.join(tmp, f"fastnn_to_torch_{world}_after")
    full = torch.load(path + "_full.pt")
    pairs = []
    for cls in (fastnn.optim.AdamW, torch.optim.AdamW):
        model = _mlp(7, "cpu")
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1)
        _load(model, opt, path)
        for p, want, want_state in zip(model.parameters(), full["params"], full["state"]):
            torch.testing.assert_close(p.detach(), want, **TOL)
            assert opt.state[p].keys() == want_state.keys()
            for k, v in want_state.items():
                torch.testing.assert_close(opt.state[p][k].float(), v.float(), **TOL,
                                           msg=lambda m: f"{cls.__module__} state[{k!r}]: {m}")
        _loss_backward(model, 9, 0, "cpu")
        opt.step()
        pairs.append(model)
    _assert_params_equal(pairs[0], pairs[1], "single process after loading")


def test_optimizers_on_dtensors_2_processes(tmp_path):
    run_on_ranks(_run_all, world=2, args=("cpu", str(tmp_path)), timeout=90)
    _load_single_process(str(tmp_path), 2)


def test_optimizers_on_dtensors_4_processes():
    run_on_ranks(_run_all, world=4, args=("cpu", None), timeout=90)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2])
def test_optimizers_on_dtensors_nccl(world, tmp_path):
    if not torch.cuda.is_available() or torch.cuda.device_count() < world or not dist.is_nccl_available():
        pytest.skip(f"needs {world} CUDA devices and NCCL")
    run_on_ranks(_run_all, world=world, args=("cuda", str(tmp_path)), timeout=180)
    _load_single_process(str(tmp_path), world)
