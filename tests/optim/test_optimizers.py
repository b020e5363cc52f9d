"""fastnn.optim.Adam / AdamW / SGD against torch.optim: training trajectories, state_dict, GradScaler,
schedulers, frozen and grad-less parameters, mixed dtypes, errors. On every backend present."""

import copy
import itertools
import math

import pytest
import torch

import fastnn
from fastnn import backends, testing

STEPS = 50

# (name, torch class, fastnn class, constructor options)
CONFIGS = [
    ("adam", torch.optim.Adam, fastnn.optim.Adam, dict(lr=1e-2)),
    ("adam-wd-amsgrad", torch.optim.Adam, fastnn.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adam-maximize", torch.optim.Adam, fastnn.optim.Adam, dict(lr=1e-3, betas=(0.8, 0.9), maximize=True)),
    ("adamw", torch.optim.AdamW, fastnn.optim.AdamW, dict(lr=1e-2, weight_decay=0.05)),
    ("adamw-amsgrad", torch.optim.AdamW, fastnn.optim.AdamW, dict(lr=3e-3, amsgrad=True, eps=1e-6)),
    ("sgd", torch.optim.SGD, fastnn.optim.SGD, dict(lr=0.05)),
    ("sgd-momentum-wd", torch.optim.SGD, fastnn.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("sgd-nesterov", torch.optim.SGD, fastnn.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd-dampening-maximize", torch.optim.SGD, fastnn.optim.SGD,
     dict(lr=0.05, momentum=0.8, dampening=0.2, maximize=True)),
]
IDS = [c[0] for c in CONFIGS]


def make_model(dtype=torch.float32, device="cpu"):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(12, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5),
                               torch.nn.LayerNorm(5)).to(device=device, dtype=dtype)


def batch(i, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(100 + i)
    return (torch.randn(16, 12, generator=g).to(device, dtype), torch.randn(16, 5, generator=g).to(device, dtype))


def param_groups(model, opts):
    """Two groups with their own hyperparameters (the second has a different lr)."""
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first}, {"params": rest, "lr": opts.get("lr", 1e-3) * 0.5}]


def train(opt_cls, opts, *, steps=STEPS, backend=None, scheduler=None, dtype=torch.float32, device="cpu",
          model=None, grad_hook=None):
    model = model or make_model(dtype, device)
    opt = opt_cls(param_groups(model, opts), **opts)
    sched = scheduler(opt) if scheduler else None
    for i in range(steps):
        x, y = batch(i, dtype, device)
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        # maximize=True ascends: ascend the negated loss so that training stays well conditioned
        (-loss if opts.get("maximize") else loss).backward()
        if grad_hook:
            grad_hook(i, model)
        if backend is None:
            opt.step()
        else:
            with backends.force(backend):
                opt.step()
        if sched:
            sched.step()
    return model, opt


def assert_models_close(a, b, dtype=torch.float32):
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        testing.assert_close(pa.detach(), pb.detach(), dtype=dtype, msg=name)


def optim_backend_or_skip(backend, device):
    p = torch.zeros(1, device=device)
    testing.backend_or_skip(fastnn.ops.adam_step_, backend, [p], [p], [p], [p], [], [torch.zeros((), device=device)],
                            lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                            decoupled=False)


@pytest.mark.parametrize("name, torch_cls, fastnn_cls, opts", CONFIGS, ids=IDS)
def test_trajectory_matches_torch(backend, device_for, name, torch_cls, fastnn_cls, opts):
    optim_backend_or_skip(backend, device_for)
    ref, _ = train(torch_cls, opts, device=device_for)
    got, _ = train(fastnn_cls, opts, backend=backend, device=device_for)
    assert_models_close(got, ref)


SCHEDULERS = {
    "steplr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=STEPS),
    "cosine-warm-restarts": lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10),
}


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name, torch_cls, fastnn_cls, opts", [CONFIGS[4], CONFIGS[6]], ids=[IDS[4], IDS[6]])
def test_lr_schedulers(sched, name, torch_cls, fastnn_cls, opts):
    ref, _ = train(torch_cls, opts, scheduler=SCHEDULERS[sched])
    got, _ = train(fastnn_cls, opts, scheduler=SCHEDULERS[sched])
    assert_models_close(got, ref)


def test_tensor_lr(backend, device_for):
    """A tensor learning rate changed in place every step (the capturable-schedule pattern)."""
    optim_backend_or_skip(backend, device_for)

    def run(cls, be, **extra):
        model = make_model(device=device_for)
        opt = cls(model.parameters(), lr=torch.tensor(0.01, device=device_for), weight_decay=0.01, **extra)
        for i in range(20):
            opt.param_groups[0]["lr"].fill_(0.01 / (1 + i))
            x, y = batch(i, device=device_for)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if be is None:
                opt.step()
            else:
                with backends.force(be):
                    opt.step()
        return model

    ref = run(torch.optim.AdamW, None, capturable=device_for.type == "cuda")
    assert_models_close(run(fastnn.optim.AdamW, backend), ref)


def test_grad_none_parameters_are_skipped_and_get_no_state(backend, device_for):
    optim_backend_or_skip(backend, device_for)
    for cls in (fastnn.optim.AdamW, fastnn.optim.SGD):
        model = make_model(device=device_for)
        model[3].weight.requires_grad_(False)  # frozen: never gets a gradient
        opt = cls(model.parameters(), lr=0.01, **({"momentum": 0.9} if cls is fastnn.optim.SGD else {}))
        frozen_before = model[3].weight.detach().clone()
        x, y = batch(0, device=device_for)
        ((model(x) - y) ** 2).mean().backward()
        model[2].bias.grad = None  # a parameter whose grad is None this step
        bias_before = model[2].bias.detach().clone()
        with backends.force(backend):
            opt.step()
        assert model[3].weight not in opt.state and model[2].bias not in opt.state
        assert torch.equal(model[3].weight, frozen_before) and torch.equal(model[2].bias, bias_before)
        assert model[0].weight in opt.state


def test_parameter_gains_grad_later():
    """A parameter without a gradient for a few steps then with one: state made on its first grad."""
    def hook(i, model):
        if i < 5:
            model[3].bias.grad = None

    ref, opt_r = train(torch.optim.Adam, dict(lr=1e-2), grad_hook=hook, steps=12)
    got, opt_f = train(fastnn.optim.Adam, dict(lr=1e-2), grad_hook=hook, steps=12)
    assert_models_close(got, ref)
    assert opt_f.state[got[3].bias]["step"].item() == opt_r.state[ref[3].bias]["step"].item() == 7


@pytest.mark.parametrize("name, torch_cls, fastnn_cls, opts", [CONFIGS[1], CONFIGS[4], CONFIGS[7]],
                         ids=[IDS[1], IDS[4], IDS[7]])
def test_state_dict_round_trips_both_ways(name, torch_cls, fastnn_cls, opts):
    """Train 20 steps with one, continue 20 with the other from its state_dict: identical to 40 steps
    with torch alone (and the state_dict formats match key for key)."""
    ref_model, _ = train(torch_cls, opts, steps=40)
    for first, second in ((torch_cls, fastnn_cls), (fastnn_cls, torch_cls)):
        model = make_model()
        opt1 = first(param_groups(model, opts), **opts)
        for i in range(20):
            x, y = batch(i)
            opt1.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt1.step()
        sd = copy.deepcopy(opt1.state_dict())
        opt2 = second(param_groups(model, opts), **opts)
        opt2.load_state_dict(sd)
        assert _structure(opt2.state_dict()) == _structure(sd)
        for i in range(20, 40):
            x, y = batch(i)
            opt2.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt2.step()
        assert_models_close(model, ref_model)


def _structure(sd):
    groups = [sorted(k for k in g if k != "params") for g in sd["param_groups"]]
    state = {k: sorted(v) for k, v in sd["state"].items()}
    return groups, state


def test_state_dict_format_equals_torch():
    _, opt_t = train(torch.optim.AdamW, dict(lr=1e-2, amsgrad=True), steps=3)
    _, opt_f = train(fastnn.optim.AdamW, dict(lr=1e-2, amsgrad=True), steps=3)
    sd_t, sd_f = opt_t.state_dict(), opt_f.state_dict()
    assert _structure(sd_t) == _structure(sd_f)
    for k in sd_t["state"]:
        for key in sd_t["state"][k]:
            a, b = sd_t["state"][k][key], sd_f["state"][k][key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
    assert [{k: v for k, v in g.items()} for g in sd_t["param_groups"]] == sd_f["param_groups"]


@pytest.mark.gpu
def test_state_dict_moves_between_devices():
    """Saved on the CPU, loaded for CUDA parameters (and back): training continues identically."""
    opts = dict(lr=1e-2, weight_decay=0.01)
    ref, _ = train(torch.optim.AdamW, opts, steps=30)
    model = make_model()
    opt = fastnn.optim.AdamW(param_groups(model, opts), **opts)
    for i in range(15):
        x, y = batch(i)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    sd = opt.state_dict()
    model = model.cuda()
    opt = fastnn.optim.AdamW(param_groups(model, opts), **opts)
    opt.load_state_dict(sd)
    for i in range(15, 30):
        x, y = batch(i, device="cuda")
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert_models_close(model.cpu(), ref)


def test_add_param_group_and_zero_grad():
    model = make_model()
    opt = fastnn.optim.Adam(model[0].parameters(), lr=1e-2)
    ref_model = make_model()
    ref = torch.optim.Adam(ref_model[0].parameters(), lr=1e-2)
    for i in range(10):
        if i == 4:
            opt.add_param_group({"params": model[2].parameters(), "lr": 5e-3, "weight_decay": 0.1})
            ref.add_param_group({"params": ref_model[2].parameters(), "lr": 5e-3, "weight_decay": 0.1})
        for m, o in ((model, opt), (ref_model, ref)):
            x, y = batch(i)
            o.zero_grad(set_to_none=(i % 2 == 0))
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    assert_models_close(model, ref_model)


def test_step_hooks_and_closure():
    model = make_model()
    opt = fastnn.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == ["pre", "post"] and isinstance(loss, torch.Tensor)


@pytest.mark.parametrize("cls, opts", [(torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01)),
                                       (torch.optim.SGD, dict(lr=0.05, momentum=0.9))], ids=["adamw", "sgd"])
def test_grad_scaler_with_injected_infs(cls, opts):
    """GradScaler skips exactly the steps torch skips (inf/NaN gradients injected at steps 3 and 7)
    and the scale evolves identically."""
    fastnn_cls = fastnn.optim.AdamW if cls is torch.optim.AdamW else fastnn.optim.SGD

    def run(opt_cls):
        model = make_model()
        opt = opt_cls(param_groups(model, opts), **opts)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=4)
        scales = []
        for i in range(STEPS):
            x, y = batch(i)
            opt.zero_grad()
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if i in (3, 7):
                model[0].weight.grad[0, 0] = float("inf") if i == 3 else float("nan")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
        return model, opt, scales

    ref, opt_r, scales_r = run(cls)
    got, opt_f, scales_f = run(fastnn_cls)
    assert scales_f == scales_r
    assert_models_close(got, ref)
    if cls is torch.optim.AdamW:  # skipped steps are not counted
        assert opt_f.state[got[0].weight]["step"].item() == opt_r.state[ref[0].weight]["step"].item() == STEPS - 2


def test_grad_scaler_with_explicit_unscale_and_clipping():
    """The documented AMP recipe: unscale_, clip_grad_norm_, step."""
    def run(opt_cls):
        model = make_model()
        opt = opt_cls(model.parameters(), lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        for i in range(20):
            x, y = batch(i)
            opt.zero_grad()
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
        return model

    assert_models_close(run(fastnn.optim.AdamW), run(torch.optim.AdamW))


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "triton"])
def test_fused_clipping_matches_clip_grad_norm(backend_name):
    """max_grad_norm=: the same parameters as clip_grad_norm_ before a torch step, and the norm."""
    optim_backend_or_skip(backend_name, torch.device("cpu"))
    norms_r, norms_f = [], []

    def clip_hook(norms):
        def hook(i, model):
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05).item())
        return hook

    ref, _ = train(torch.optim.AdamW, dict(lr=1e-2), grad_hook=clip_hook(norms_r), steps=20)
    model = make_model()
    opt = fastnn.optim.AdamW(param_groups(model, dict(lr=1e-2)), lr=1e-2, max_grad_norm=0.05)
    for i in range(20):
        x, y = batch(i)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with backends.force(backend_name):
            opt.step()
        norms_f.append(opt.last_grad_norm.item())
    assert_models_close(model, ref)
    assert norms_f == pytest.approx(norms_r, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params(dtype):
    """bf16/fp16 parameters (fp32 math): error against a float64 run at most 2x that of torch's
    own optimizer on the same low-precision parameters."""
    opts = dict(lr=1e-2, weight_decay=0.01)
    ref64, _ = train(torch.optim.AdamW, opts, dtype=torch.float64)
    torch_low, _ = train(torch.optim.AdamW, opts, dtype=dtype)
    got, opt = train(fastnn.optim.AdamW, opts, dtype=dtype)
    assert opt.state[got[0].weight]["exp_avg"].dtype == dtype  # torch's state layout
    for (name, g), t, r in zip(got.named_parameters(), torch_low.parameters(), ref64.parameters()):
        testing.assert_error_bounded(g.detach(), r.detach(), t.detach(), floor=1e-3, msg=name)


def test_mixed_dtypes_in_one_optimizer():
    """fp32, bf16 and fp16 parameters in one optimizer: each steps exactly like it would alone."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(37, dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float16)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fastnn.optim.Adam(params, lr=1e-2)
    singles = [fastnn.optim.Adam([c], lr=1e-2) for c in clones]
    for i in range(10):
        grads = [torch.randn(37, dtype=p.dtype) for p in params]
        for p, c, g in zip(params, clones, grads):
            p.grad, c.grad = g.clone(), g.clone()
        opt.step()
        for s in singles:
            s.step()
    for p, c in zip(params, clones):
        assert torch.equal(p, c)


def test_frozen_parameters_cost_nothing():
    """Frozen parameters never get state and are never read by the step (their grad stays None)."""
    model = make_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = fastnn.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = batch(0)
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
    assert len(opt.state) == len([p for p in model.parameters() if p.requires_grad])


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [fastnn.optim.Adam, fastnn.optim.AdamW, fastnn.optim.SGD])
def test_constructor_errors_match_torch(cls):
    torch_cls = getattr(torch.optim, cls.__name__)
    p = torch.nn.Parameter(torch.randn(3))
    cases = [dict(lr=-1.0)]
    if cls is not fastnn.optim.SGD:
        cases += [dict(betas=(1.0, 0.999)), dict(betas=(0.9, -0.1)), dict(eps=-1.0)]
    else:
        cases += [dict(momentum=-0.5), dict(nesterov=True)]
    for kw in cases:
        with pytest.raises(ValueError) as t_err:
            torch_cls([p], **kw)
        with pytest.raises(ValueError) as f_err:
            cls([p], **kw)
        assert str(f_err.value) == str(t_err.value)
    with pytest.raises(ValueError, match="more than one parameter group"):
        cls([{"params": [p]}, {"params": [p]}], lr=0.1)


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fastnn.optim.Adam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_complex_parameters_are_rejected_clearly():
    with pytest.raises(ValueError, match="complex parameters are not supported"):
        fastnn.optim.AdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_differentiable_is_rejected():
    with pytest.raises(ValueError, match="differentiable=True"):
        fastnn.optim.Adam([torch.nn.Parameter(torch.randn(3))], differentiable=True)


def test_is_a_torch_optimizer():
    p = [torch.nn.Parameter(torch.randn(3))]
    assert isinstance(fastnn.optim.AdamW(p), torch.optim.AdamW)
    assert isinstance(fastnn.optim.SGD(p), torch.optim.SGD)


def test_compiled_model_with_fastnn_optimizer():
    """A torch.compile'd model trained by a fastnn optimizer: the step stays out of the graph."""
    model = make_model()
    ref_model = make_model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    opt = fastnn.optim.AdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for i in range(5):
        x, y = batch(i)
        for m, o in ((compiled, opt), (ref_model, ref)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    assert_models_close(model, ref_model)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """The fused step captured in a CUDA graph (static grads, tensor lr) replays like eager steps."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (5, 4096, 70_000)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    lr = torch.tensor(1e-2, device="cuda")
    opt = fastnn.optim.AdamW(params, lr=lr)
    eager = fastnn.optim.AdamW(clones, lr=lr.clone())
    grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up outside the graph builds the state and tables
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for c, g in zip(clones, grads):
        c.grad = g.clone()
    for _ in range(3):
        eager.step()
    for _ in range(4):
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, c in zip(params, clones):
        testing.assert_close(p.detach(), c.detach())


def test_many_small_tensors_one_plan():
    """2000 small parameters: one plan, stepped by one call; parity with torch."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(17)) for _ in range(2000)]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fastnn.optim.AdamW(params, lr=1e-3)
    ref = torch.optim.AdamW(clones, lr=1e-3)
    for _ in range(3):
        for p, c in zip(params, clones):
            g = torch.randn(17)
            p.grad, c.grad = g, g.clone()
        opt.step()
        ref.step()
    assert len(opt._plans) == 1
    for p, c in zip(params, clones):
        testing.assert_close(p.detach(), c.detach())


@pytest.mark.gpu
def test_parameters_on_several_devices():
    """CPU and CUDA parameters in one optimizer, with clipping over both: like torch on each."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(77, device="cuda"))]
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = fastnn.optim.AdamW(params, lr=1e-2, max_grad_norm=0.5)
    ref = torch.optim.AdamW(clones, lr=1e-2)
    for _ in range(10):
        for p, c in zip(params, clones):
            g = torch.randn_like(p)
            p.grad, c.grad = g, g.clone()
        torch.nn.utils.clip_grad_norm_(clones, 0.5)
        opt.step()
        ref.step()
    assert len(opt._plans) == 2
    for p, c in zip(params, clones):
        testing.assert_close(p.detach(), c.detach())


@pytest.mark.parametrize("bad, error", [("1.0", TypeError), (True, TypeError), (0.0, ValueError), (float("nan"), ValueError)])
def test_max_grad_norm_must_be_a_positive_number(bad, error):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(error, match="max_grad_norm"):
        fastnn.optim.AdamW([p], max_grad_norm=bad)
