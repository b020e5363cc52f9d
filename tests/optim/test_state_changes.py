"""fastnn's optimizers follow every change a user makes between steps, as torch.optim does: state
cleared or replaced, parameters swapped or resized, hyperparameters switched, skipped first steps,
expanded or NaN gradients. Each case runs the same script on torch.optim and on fastnn, on every
backend present (the cpu backend steps through the C++ plan, reference and triton through the
Python path)."""

import pytest
import torch

import fastnn
from fastnn import backends, testing

TORCH = {fastnn.optim.Adam: torch.optim.Adam, fastnn.optim.AdamW: torch.optim.AdamW, fastnn.optim.SGD: torch.optim.SGD}


# The device the current test runs on: CUDA for the cuda backend (and triton with a GPU), where
# the same scripts check the CUDA plan (hyperparameter switches once dereferenced null there).
DEVICE = [torch.device("cpu")]


def _backend_or_skip(backend, device, *, cuda_ok=False):
    if device.type != "cpu" and not cuda_ok:
        pytest.skip("this script runs on the CPU (the cpu backend shares the C++ plan with cuda)")
    DEVICE[0] = device
    p = torch.zeros(1, device=device)
    testing.backend_or_skip(fastnn.ops.adam_step_, backend, [p], [p], [p], [p], [], [torch.zeros((), device=device)],
                            lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
                            decoupled=False)


def _params(seed=0, shapes=((5, 3), (7,), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE[0])) for s in shapes]


def _grads(params, i):
    g = torch.Generator().manual_seed(1000 + i)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.device)


def _run(cls, opts, script, steps, backend=None):
    """Steps an optimizer over fresh parameters, calling script(i, opt, params) before each step."""
    params = _params()
    opt = cls(params, **opts)
    for i in range(steps):
        _grads([p for group in opt.param_groups for p in group["params"]], i)
        script(i, opt, params)
        if backend is None:
            opt.step()
        else:
            with backends.force(backend):
                opt.step()
    return opt


def _after_one_step(cls, opts, backend):
    """Parameters and an optimizer that has taken one step on ``backend``."""
    params = _params()
    opt = cls(params, **opts)
    _grads(params, 0)
    with backends.force(backend):
        opt.step()
    return params, opt


def _same(cls, opts, script, backend, steps=6):
    ref = _run(TORCH[cls], opts, script, steps)
    got = _run(cls, opts, script, steps, backend)
    for gr, gg in zip(ref.param_groups, got.param_groups):
        for a, b in zip(gr["params"], gg["params"]):
            testing.assert_close(b.detach(), a.detach())
    return ref, got


ADAM = (fastnn.optim.AdamW, dict(lr=0.05, weight_decay=0.01))
SGD = (fastnn.optim.SGD, dict(lr=0.05, momentum=0.9))


@pytest.mark.parametrize("cls, opts", [ADAM, SGD], ids=["adamw", "sgd"])
def test_state_cleared(backend, device_for, cls, opts):
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        if i == 3:
            opt.state.clear()

    ref, got = _same(cls, opts, script, backend)
    assert len(got.state_dict()["state"]) == len(ref.state_dict()["state"]) == 3


def test_state_tensors_replaced(backend, device_for):
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        if i == 3:
            st = opt.state[params[0]]
            st["exp_avg"] = torch.full_like(params[0], 0.5)
            st["step"] = torch.tensor(100.0)  # torch's own layout: a CPU float32 counter
            opt.state[params[1]]["exp_avg_sq"] = torch.full_like(params[1], 2.0)

    _same(*ADAM, script, backend)


def test_momentum_buffer_replaced(backend, device_for):
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        if i == 3:
            opt.state[params[2]]["momentum_buffer"] = torch.ones_like(params[2])

    _same(*SGD, script, backend)


@pytest.mark.parametrize("cls, opts", [ADAM, SGD], ids=["adamw", "sgd"])
def test_parameter_replaced_in_its_list(backend, device_for, cls, opts):
    """param_groups[0]['params'][1] = new_p: the same list, the same length; new_p is stepped."""
    _backend_or_skip(backend, device_for, cuda_ok=True)
    replacement = {}

    def script(i, opt, params):
        if i == 2:
            new = torch.nn.Parameter(torch.linspace(-1, 1, 7, device=DEVICE[0]))
            replacement.setdefault(id(opt), new)
            opt.param_groups[0]["params"][1] = new
            _grads([new], 77)

    ref, got = _same(cls, opts, script, backend)
    assert not torch.equal(got.param_groups[0]["params"][1].detach().cpu(), torch.linspace(-1, 1, 7))


def test_amsgrad_switched_on(backend, device_for):
    """torch.optim.Adam raises KeyError when amsgrad is switched on after the state was made;
    fastnn starts the max from zero, which is torch with that entry added."""
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        if i == 3:
            opt.param_groups[0]["amsgrad"] = True
            if not isinstance(opt, fastnn.optim.AdamW):
                for p in params:
                    opt.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)

    _same(*ADAM, script, backend)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_switched_on(backend, device_for, nesterov):
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        if i == 3:
            opt.param_groups[0]["momentum"] = 0.9
            opt.param_groups[0]["nesterov"] = nesterov

    _same(fastnn.optim.SGD, dict(lr=0.05), script, backend)


@pytest.mark.parametrize("cls, opts", [ADAM, SGD], ids=["adamw", "sgd"])
def test_negative_lr_set_after_construction(backend, device_for, cls, opts):
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        if i == 2:
            opt.param_groups[0]["lr"] = -0.01

    _same(cls, opts, script, backend)


@pytest.mark.parametrize("cls, opts", [ADAM, SGD], ids=["adamw", "sgd"])
@pytest.mark.parametrize("size", [40, 2], ids=["larger", "smaller"])
def test_parameter_data_resized_raises_before_any_change(backend, device_for, cls, opts, size):
    """p.data = a tensor of another size: torch raises a size mismatch; so does fastnn, on every
    backend, before anything changes (it used to overflow the heap, or use wrong-size state)."""
    _backend_or_skip(backend, device_for)
    params, opt = _after_one_step(cls, opts, backend)
    params[1].data = torch.randn(size)
    params[1].grad = torch.randn(size)
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    with pytest.raises((ValueError, RuntimeError), match=r"shape|size"):
        with backends.force(backend):
            opt.step()
    for b, p in zip(before, params):
        assert torch.equal(b, p.detach())
    for k, v in opt.state[params[0]].items():
        assert torch.equal(v, state_before[k]), k


def test_expanded_gradient_is_read_like_torch(backend, device_for):
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def script(i, opt, params):
        params[0].grad = torch.randn(1, 3, generator=torch.Generator().manual_seed(i)).to(DEVICE[0]).expand(5, 3)

    _same(*ADAM, script, backend)


@pytest.mark.parametrize("cls, opts", [ADAM, SGD], ids=["adamw", "sgd"])
def test_expanded_gradient_under_grad_scale_raises_before_any_change(backend, device_for, cls, opts):
    """With a grad_scale the step writes the unscaled gradient back, which an expanded gradient
    cannot hold: the error comes before the parameters, moments or step counters change."""
    _backend_or_skip(backend, device_for)
    params, opt = _after_one_step(cls, opts, backend)
    _grads(params, 1)
    params[2].grad = torch.randn(1, 2).expand(2, 2)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    before = [p.detach().clone() for p in params]
    states = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    with pytest.raises(ValueError, match="share memory"):
        with backends.force(backend):
            opt.step()
    for b, p in zip(before, params):
        assert torch.equal(b, p.detach())
        for k, v in opt.state[p].items():
            assert torch.equal(v, states[id(p)][k]), k


def test_sgd_momentum_after_a_skipped_first_step(backend, device_for):
    """GradScaler skips the first step (an inf gradient): the state then is torch's (no momentum
    buffer, never uninitialised memory), the next steps match torch, and a checkpoint taken after
    the skipped step resumes in torch.optim.SGD."""
    _backend_or_skip(backend, device_for)

    def run(cls, checkpoint_at=None):
        params = _params()
        opt = cls(params, lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for i in range(5):
            _grads(params, i)
            scale = scaler.scale(torch.ones(()))  # what scaler.scale(loss).backward() would multiply by
            for p in params:
                p.grad.mul_(scale)
            if i == 0:
                params[0].grad[0, 0] = float("inf")
            with backends.force(backend):
                scaler.step(opt)
            scaler.update()
            if i == 0:
                assert all(opt.state.get(p, {}).get("momentum_buffer") is None for p in params)
            if i == checkpoint_at:
                resumed = torch.optim.SGD(params, lr=0.05, momentum=0.9)
                resumed.load_state_dict(opt.state_dict())
                opt = resumed
        return params

    ref = run(torch.optim.SGD)
    for got in (run(fastnn.optim.SGD), run(fastnn.optim.SGD, checkpoint_at=0)):
        for a, b in zip(ref, got):
            testing.assert_close(b.detach(), a.detach())


@pytest.mark.parametrize("cls, opts", [ADAM, SGD], ids=["adamw", "sgd"])
def test_nan_gradient_with_clipping_makes_everything_nan(backend, device_for, cls, opts):
    """max_grad_norm with a NaN gradient: clip_grad_norm_'s factor is NaN, so every parameter
    becomes NaN, as torch with clip_grad_norm_ before its step (the CPU factor used to be 1)."""
    _backend_or_skip(backend, device_for, cuda_ok=True)
    params = _params()
    opt = cls(params, max_grad_norm=1.0, **opts)
    _grads(params, 0)
    params[1].grad[3] = float("nan")
    with backends.force(backend):
        opt.step()
    assert opt.last_grad_norm.isnan()
    assert all(p.isnan().all() for p in params)


def test_many_groups_each_with_their_lr(backend, device_for):
    """40 parameter groups (layer-wise lr decay), more than one CUDA launch carries."""
    _backend_or_skip(backend, device_for, cuda_ok=True)

    def run(cls, be=None):
        params = [torch.nn.Parameter(torch.full((3,), float(i), device=DEVICE[0])) for i in range(40)]
        opt = cls([{"params": [p], "lr": 0.01 * (i + 1)} for i, p in enumerate(params)], lr=0.1)
        for i in range(3):
            _grads(params, i)
            with backends.force(be) if be else torch.no_grad():
                opt.step()
        return params

    for a, b in zip(run(torch.optim.AdamW), run(fastnn.optim.AdamW, backend)):
        testing.assert_close(b.detach(), a.detach())
