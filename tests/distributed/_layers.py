"""Models and comparisons shared by the tests/distributed/test_layers_* files: a model of fastnn's
recurrent layers and MoE (or its torch.nn twin), the single-process oracle, and the checks that a
data-parallel run equals it."""

import torch
import torch.distributed as dist
from torch import nn

import fastnn
from fastnn import testing

IN, B, T = 6, 3, 4  # input features; batch rows per rank; steps
# Where the checks run: the CPU and the default (gloo) group, or a rank's GPU and an NCCL group
# (set by use_nccl).
CTX = {"device": torch.device("cpu"), "group": None, "mesh": None}


def use_nccl(rank):
    """Run the checks on this rank's GPU over an NCCL group of every rank (the default group stays
    the launcher's gloo one)."""
    from torch.distributed.device_mesh import DeviceMesh
    torch.cuda.set_device(rank)
    group = dist.new_group(backend="nccl")
    CTX.update(device=torch.device("cuda", rank), group=group, mesh=DeviceMesh.from_group(group, "cuda"))


def shard_kwargs():
    """fully_shard's mesh (None: the default group's)."""
    return {} if CTX["mesh"] is None else {"mesh": CTX["mesh"]}


def ddp_kwargs():
    dev = CTX["device"]
    return {} if dev.type == "cpu" else {"device_ids": [dev.index], "process_group": CTX["group"]}


class RecurrentBlock(nn.Module):
    """A stacked bidirectional LSTM, a bidirectional GRU and a stacked relu RNN."""

    def __init__(self, lib):
        super().__init__()
        self.lstm = lib.LSTM(IN, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = lib.GRU(10, 4, bidirectional=True, batch_first=True)
        self.rnn = lib.RNN(8, 4, num_layers=2, nonlinearity="relu", batch_first=True)
        self.skip_gru = False  # find_unused_parameters: the GRU sits out a forward

    def forward(self, x):
        y, (_, c) = self.lstm(x)
        if not self.skip_gru:
            y, _ = self.gru(y)
            y, _ = self.rnn(y)
        else:
            y, _ = self.rnn(y[..., :8])
        return y + c[-1, :, :4].unsqueeze(1)  # the final cell state carries a gradient too


class MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.moe = fastnn.MoE(4, 6, num_experts=4, top_k=2, shared_expert_size=3, shared_expert_gate=True)
        self.head = nn.Linear(4, 3)

    def forward(self, y):
        return self.head(self.moe(y))


class Net(nn.Module):
    """fastnn's layers (``lib=fastnn``) or torch's (``lib=torch.nn``, no MoE: a Linear head)."""

    def __init__(self, lib=fastnn, moe=True):
        super().__init__()
        self.rec = RecurrentBlock(lib)
        self.top = MoEBlock() if moe else nn.Linear(4, 3)

    def forward(self, x):
        return self.top(self.rec(x))


def build(lib=fastnn, moe=True, frozen=False, seed=0):
    torch.manual_seed(seed)  # every rank builds the same full model
    m = Net(lib, moe).to(CTX["device"], torch.float64)
    if frozen:  # a frozen layer: the GRU, and the first LSTM layer's input weights
        m.rec.gru.requires_grad_(False)
        m.rec.lstm.weight_ih_l0.requires_grad_(False)
    return m


def global_batch(world, seed=1):
    torch.manual_seed(seed)
    return torch.randn(world * B, T, IN, dtype=torch.float64).to(CTX["device"])


def loss_fn(y):
    return y.square().mean()


def full(t):
    """A DTensor (FSDP2's sharded parameter or gradient) gathered; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, x, steps=1, lr=1e-2, skip_gru=(), inner=None):
    """``steps`` Adam steps of ``model`` on ``x``. ``inner`` is the unwrapped module (DDP's
    .module) when it differs. Returns (outputs, input grad, parameter grads by name, parameters
    after the steps), the last step's, DTensors gathered."""
    inner = inner if inner is not None else model
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = x.clone().requires_grad_()
    outs = []
    for step in range(steps):
        if skip_gru:
            inner.rec.skip_gru = step in skip_gru
        opt.zero_grad(set_to_none=True)
        y = model(x)
        loss_fn(y).backward()
        outs.append(y.detach())
        grads = {n: (None if p.grad is None else full(p.grad).clone()) for n, p in model.named_parameters()}
        xgrad = x.grad.clone()
        x.grad = None
        opt.step()
    return outs, xgrad, grads, {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def single_process(model, xs, **kw):
    """The oracle: the model on the whole global batch."""
    return train(model, xs, **kw)


def data_parallel(model, xs, rank, world, **kw):
    """The same training on this rank's rows of the global batch, through ``model`` (wrapped by an
    engine)."""
    return train(model, xs[rank * B:(rank + 1) * B], **kw)


def _strip(name):
    return name.replace("_orig_mod.", "").replace("module.", "")


def assert_matches(got, want, rank, world, what):
    """A rank's run equals the oracle: its rows of the outputs, its input gradient (the rank's loss
    is the mean over its rows, the oracle's over all: a factor ``world``), every parameter gradient
    (None where the oracle's is None) and the parameters after the step."""
    outs, xgrad, grads, params = got
    w_outs, w_xgrad, w_grads, w_params = want
    rows = slice(rank * B, (rank + 1) * B)
    for i, (a, b) in enumerate(zip(outs, w_outs)):
        testing.assert_close(a, b[rows], msg=f"{what}: output of step {i}")
    testing.assert_close(xgrad, world * w_xgrad[rows], msg=f"{what}: input grad")
    grads = {_strip(n): g for n, g in grads.items()}
    params = {_strip(n): p for n, p in params.items()}
    assert set(grads) == set(w_grads), (what, sorted(set(grads) ^ set(w_grads)))
    for n, g in w_grads.items():
        if g is None:
            assert grads[n] is None, f"{what}: {n} has a gradient, the single process has none"
        else:
            assert grads[n] is not None, f"{what}: {n} has no gradient"
            testing.assert_close(grads[n], g, msg=f"{what}: grad of {n}")
        testing.assert_close(params[n], w_params[n], msg=f"{what}: {n} after the step")
    dist.barrier(group=CTX["group"])
