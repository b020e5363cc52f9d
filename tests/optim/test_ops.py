"""fastnn.ops.adam_step_ / sgd_step_ / grad_norm_clip_coef against the reference, on every backend."""

import math

import pytest
import torch

from fastnn import backends, ops, testing
from fastnn.reference import optim as ref

SHAPES = [(), (1,), (7,), (33, 17), (0,), (3, 0, 2), (40_003,)]  # scalar, size 1, odd, empty, > one chunk
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _tensors(shapes, dtype, device, *, positive=False, scale=1.0):
    out = []
    for s in shapes:
        t = torch.randn(s, dtype=torch.float64)
        t = t.abs() if positive else t
        out.append((t * scale).to(dtype=dtype, device=device))
    return out


def _adam_args(dtype, device, amsgrad, shapes=SHAPES):
    params = _tensors(shapes, dtype, device)
    grads = _tensors(shapes, dtype, device)
    exp_avgs = _tensors(shapes, dtype, device, scale=0.1)
    exp_avg_sqs = _tensors(shapes, dtype, device, positive=True, scale=0.1)
    maxes = [v * 1.5 for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i + 1), device=device) for i in range(len(shapes))]
    return [params, grads, exp_avgs, exp_avg_sqs, maxes, steps]


def _clone(lists):
    return [[t.clone() for t in lst] for lst in lists]


def _compare(actual_lists, expected_lists, dtype):
    for lst_a, lst_e in zip(actual_lists, expected_lists):
        for a, e in zip(lst_a, lst_e):
            testing.assert_close(a, e, dtype=a.dtype if a.dtype != dtype else dtype)


def _step_with_reference(backend, op, reference, args, kw):
    """Runs ``op`` on ``backend`` (skipping when it cannot serve the inputs) and ``reference`` on a
    copy of ``args``; returns the copy."""
    testing.backend_or_skip(op, backend, *args, **kw)
    expected = _clone(args)
    with backends.force(backend):
        op(*args, **kw)
    reference(*expected, **kw)
    return expected


ADAM_OPTIONS = [
    dict(amsgrad=False, maximize=False, decoupled=False, weight_decay=0.0),
    dict(amsgrad=True, maximize=False, decoupled=False, weight_decay=0.1),
    dict(amsgrad=False, maximize=True, decoupled=True, weight_decay=0.05),
    dict(amsgrad=True, maximize=True, decoupled=True, weight_decay=0.0),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=lambda o: "-".join(k for k, v in o.items() if v))
def test_adam_step_matches_reference(backend, device_for, dtype, options):
    args = _adam_args(dtype, device_for, options["amsgrad"])
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, **options)
    expected = _step_with_reference(backend, ops.adam_step_, ref.adam_step_, args, kw)
    _compare(args, expected, dtype)


@pytest.mark.parametrize("scaling", ["grad_scale", "found_inf", "clip", "lr_tensor", "all"])
def test_adam_step_scaling_inputs(backend, device_for, scaling):
    args = _adam_args(torch.float32, device_for, amsgrad=False)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
              decoupled=True)
    f = lambda v: torch.tensor(v, device=device_for)  # noqa: E731
    if scaling in ("grad_scale", "all"):
        kw["grad_scale"] = f(1024.0)
    if scaling in ("found_inf", "all"):
        kw["found_inf"] = f(0.0 if scaling == "all" else 1.0)
    if scaling in ("clip", "all"):
        kw["clip_coef"] = f(0.25)
    if scaling in ("lr_tensor", "all"):
        kw["lr_tensor"] = f(3e-3)
    testing.backend_or_skip(ops.adam_step_, backend, *args, **kw)
    before = _clone(args)
    expected = _clone(args)
    with backends.force(backend):
        ops.adam_step_(*args, **kw)
    ref.adam_step_(*expected, **kw)
    _compare(args, expected, torch.float32)
    if scaling == "found_inf":  # a skipped step changes nothing, not even the step counts
        _compare(args, before, torch.float32)
    if scaling in ("grad_scale", "all"):  # gradients are written back unscaled
        testing.assert_close(args[1][2], before[1][2] / 1024.0)


def test_adam_precision_of_betas_near_one(backend, device_for):
    """beta2 = 0.999999 at large and small steps: 1 - beta2 and the bias corrections are computed in
    float64 as torch does (in float32 they were 1% off on Triton and CUDA)."""
    args = _adam_args(torch.float32, device_for, amsgrad=False, shapes=[(33,), (7,)])
    args[5] = [torch.tensor(0.0, device=device_for), torch.tensor(250_000.0, device=device_for)]
    kw = dict(lr=1e-2, beta1=0.999999, beta2=0.999999, eps=1e-12, weight_decay=0.0, amsgrad=False,
              maximize=False, decoupled=False)
    expected = _step_with_reference(backend, ops.adam_step_, ref.adam_step_, args, kw)
    _compare(args, expected, torch.float32)


def test_amsgrad_max_propagates_nan(backend, device_for):
    """A NaN in the running max stays NaN, and a NaN second moment becomes the max, as
    torch.maximum does (Triton's tl.maximum used to drop it)."""
    args = _adam_args(torch.float32, device_for, amsgrad=True, shapes=[(6,)])
    args[4][0][1] = float("nan")  # max_exp_avg_sq
    args[3][0][4] = float("nan")  # exp_avg_sq
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=True, maximize=False,
              decoupled=False)
    expected = _step_with_reference(backend, ops.adam_step_, ref.adam_step_, args, kw)
    assert args[4][0].isnan().tolist() == expected[4][0].isnan().tolist() == [False, True, False, False, True, False]
    _compare(args, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("variant", ["plain", "momentum", "nesterov", "dampening-maximize"])
def test_sgd_step_matches_reference(backend, device_for, dtype, first, variant):
    momentum = 0.0 if variant == "plain" else 0.9
    kw = dict(lr=0.05, momentum=momentum, dampening=0.3 if variant == "dampening-maximize" else 0.0,
              weight_decay=1e-3, nesterov=variant == "nesterov", maximize=variant == "dampening-maximize",
              is_first_step=first, grad_scale=torch.tensor(8.0, device=device_for))
    params = _tensors(SHAPES, dtype, device_for)
    grads = _tensors(SHAPES, dtype, device_for)
    bufs = _tensors(SHAPES, dtype, device_for) if momentum else []
    args = [params, grads, bufs]
    expected = _step_with_reference(backend, ops.sgd_step_, ref.sgd_step_, args, kw)
    _compare(args, expected, dtype)


def test_non_contiguous_tensors(backend, device_for):
    """A transposed parameter (and a gradient with other strides) updates like a contiguous one."""
    base = [torch.randn(5, 7, device=device_for).t() for _ in range(4)]
    params, grads, ms, vs = base[0], base[1].contiguous(), base[2], base[3].abs()
    args = [[params], [grads], [ms], [vs], [], [torch.tensor(1.0, device=device_for)]]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled=False)
    expected = _step_with_reference(backend, ops.adam_step_, ref.adam_step_, args, kw)
    _compare(args, expected, torch.float32)
    assert args[0][0].stride() == (1, 7), "the parameter keeps its layout"


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
@pytest.mark.parametrize("with_scale", [False, True])
def test_grad_norm_clip_coef(backend, device_for, norm_type, with_scale):
    grads = _tensors([(7,), (300, 3), (0,), (40_001,)], torch.float32, device_for)
    grads.append(torch.randn(9, device=device_for).bfloat16())
    scale = torch.tensor(64.0, device=device_for) if with_scale else None
    testing.backend_or_skip(ops.grad_norm_clip_coef, backend, grads, 1.0, norm_type, scale)
    with backends.force(backend):
        norm, coef = ops.grad_norm_clip_coef(grads, 1.0, norm_type, scale)
    ref_norm, ref_coef = ref.grad_norm_clip_coef(grads, 1.0, norm_type, scale)
    testing.assert_close(norm, ref_norm)
    testing.assert_close(coef, ref_coef)
    # and against torch's own clip_grad_norm_ (which also clips in place; it rejects the inf-norm of
    # an empty gradient, which fastnn treats as contributing nothing)
    params = [torch.nn.Parameter(torch.empty_like(g, dtype=torch.float64)) for g in grads if g.numel()]
    grads = [g for g in grads if g.numel()]
    for p, g in zip(params, grads):
        p.grad = g.double() / (scale.double() if scale is not None else 1.0)
    torch_norm = torch.nn.utils.clip_grad_norm_(params, 1.0, norm_type)
    testing.assert_close(norm.double(), torch_norm.to(norm.device), dtype=torch.float32)


def test_grad_norm_propagates_nan(backend, device_for):
    grads = [torch.randn(50, device=device_for), torch.tensor([1.0, float("nan")], device=device_for)]
    testing.backend_or_skip(ops.grad_norm_clip_coef, backend, grads, 1.0)
    with backends.force(backend):
        norm, _ = ops.grad_norm_clip_coef(grads, 1.0)
        inf_norm, _ = ops.grad_norm_clip_coef(grads, 1.0, math.inf)
    assert norm.isnan() and inf_norm.isnan()


# -- bad input ------------------------------------------------------------------------------------

def _one_adam(**over):
    p = torch.randn(4)
    lists = dict(params=[p], grads=[torch.randn(4)], exp_avgs=[torch.zeros(4)], exp_avg_sqs=[torch.zeros(4)],
                 max_exp_avg_sqs=[], steps=[torch.tensor(0.0)])
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled=False)
    for k, v in over.items():
        (lists if k in lists else kw)[k] = v
    return list(lists.values()), kw


@pytest.mark.parametrize("bad, message", [
    (dict(eps=-1.0), "'adam_step: eps'"),
    (dict(beta1=1.0), "'beta1'"),
    (dict(beta2=-0.1), "'beta2'"),
    (dict(grads=[torch.randn(5)]), "'grads[0]'"),
    (dict(grads=[torch.randn(4, dtype=torch.float64)]), "'grads[0]'"),
    (dict(exp_avgs=[]), "'exp_avgs'"),
    (dict(params=[torch.randn(4, dtype=torch.complex64)], grads=[torch.randn(4, dtype=torch.complex64)]), "complex"),
    (dict(params=[torch.arange(4)], grads=[torch.arange(4)]), "'params[0]'"),
    (dict(grads=[torch.randn(4).to_sparse()]), "sparse"),
    (dict(steps=[torch.tensor(0, dtype=torch.int64)]), "'steps[0]'"),
    (dict(amsgrad=True), "'max_exp_avg_sqs'"),
    (dict(grad_scale=torch.ones(2)), "'grad_scale'"),
])
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_adam_bad_input_names_the_argument(bad, message, backend_name):
    args, kw = _one_adam(**bad)
    ok_args, ok_kw = _one_adam()
    testing.backend_or_skip(ops.adam_step_, backend_name, *ok_args, **ok_kw)
    before = [t.clone() for t in args[0]]
    # fastnn: argument 'adam_step: <name>': ... (the op's name, then the argument's)
    with pytest.raises((ValueError, RuntimeError), match=message.lstrip("'").replace("[", r"\[").replace("]", r"\]")):
        with backends.force(backend_name):
            ops.adam_step_(*args, **kw)
    for b, a in zip(before, args[0]):
        if a.dtype == b.dtype and a.is_floating_point():
            assert torch.equal(a, b), "a rejected call must not modify its inputs"


def test_forced_backend_that_cannot_serve_says_why():
    args, kw = _one_adam()
    with backends.force("cuda"):
        with pytest.raises(backends.BackendError, match="cuda"):
            ops.adam_step_(*args, **kw)


# -- opcheck --------------------------------------------------------------------------------------

def _opcheck_cases(device):
    args = _adam_args(torch.float32, device, amsgrad=True, shapes=[(3,), (5, 2)])
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
              decoupled=True, grad_scale=torch.tensor(2.0, device=device))
    sgd = ([_tensors([(3,)], torch.float32, device)[0]], [torch.randn(3, device=device)],
           [torch.randn(3, device=device)])
    sgd_kw = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False,
                  is_first_step=False)
    return args, kw, sgd, sgd_kw


@pytest.mark.parametrize("which", ["native", "triton"])
def test_opcheck(which):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    args, kw, sgd, sgd_kw = _opcheck_cases(device)
    if which == "native":
        testing.backend_or_skip(ops.adam_step_, device.type, *args, **kw)
        testing.opcheck(torch.ops.fastnn.adam_step_.default, tuple(args), kw)
        testing.opcheck(torch.ops.fastnn.sgd_step_.default, sgd, sgd_kw)
        testing.opcheck(torch.ops.fastnn.grad_norm_clip_coef.default, (args[1], 1.0), {})
    else:
        testing.backend_or_skip(ops.adam_step_, "triton", *args, **kw)
        testing.opcheck(torch.ops.fastnn.triton_adam_step_.default, tuple(args), kw)
        testing.opcheck(torch.ops.fastnn.triton_sgd_step_.default, sgd, sgd_kw)


# -- devices and precision (each also runs on the cuda and GPU triton backends where a GPU is) -------

def test_grad_norm_of_float64_gradients_beyond_float_range(backend, device_for):
    """float64 gradients are reduced in float64, as torch does: squares of 1e20 overflow float."""
    grads = [torch.full((3000,), 1e20, dtype=torch.float64, device=device_for),
             torch.full((5,), -2e20, dtype=torch.float64, device=device_for)]
    testing.backend_or_skip(ops.grad_norm_clip_coef, backend, grads, 1.0)
    with backends.force(backend):
        norm, coef = ops.grad_norm_clip_coef(grads, 1.0)
    want = torch.cat(grads).norm()
    assert torch.isfinite(norm) and torch.isclose(norm.double(), want, rtol=1e-6)
    assert coef.item() == pytest.approx(1.0 / want.item(), rel=1e-5)


def test_scalar_inputs_on_the_cpu(backend, device_for):
    """grad_scale, found_inf, clip_coef and a tensor lr living on the CPU while the parameters are
    on the device: read or moved as torch's fused optimizers do (Triton took their CPU addresses)."""
    args = _adam_args(torch.float32, device_for, amsgrad=False, shapes=[(40,), (3, 5)])
    kw = dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, amsgrad=False, maximize=False,
              decoupled=True, lr_tensor=torch.tensor(3e-3), grad_scale=torch.tensor(8.0),
              found_inf=torch.tensor(0.0), clip_coef=torch.tensor(0.5))
    expected = _step_with_reference(backend, ops.adam_step_, ref.adam_step_, args, kw)
    _compare(args, expected, torch.float32)


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_launch_on_the_tensors_device(backend_name):
    """Parameters on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (its stream)."""
    _two_gpus()
    args = _adam_args(torch.float32, torch.device("cuda:1"), amsgrad=True, shapes=[(70_000,), (33,)])
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
              decoupled=True, grad_scale=torch.tensor(2.0, device="cuda:1"))
    testing.backend_or_skip(ops.adam_step_, backend_name, *args, **kw)
    expected = _clone(args)
    with torch.cuda.device(0), backends.force(backend_name):
        ops.adam_step_(*args, **kw)
        norm, _ = ops.grad_norm_clip_coef(args[1], 1.0)
    ref.adam_step_(*expected, **kw)
    torch.cuda.synchronize(1)
    _compare(args, expected, torch.float32)
    assert norm.device == torch.device("cuda:1")


@pytest.mark.gpu
def test_lr_tensor_on_another_device_is_rejected_by_the_compiled_op():
    _two_gpus()
    args = _adam_args(torch.float32, torch.device("cuda:0"), amsgrad=False, shapes=[(8,)])
    kw = dict(lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
              decoupled=False, lr_tensor=torch.tensor(1e-3, device="cuda:1"))
    with pytest.raises(ValueError, match="lr_tensor"):
        torch.ops.fastnn.adam_step_(*args, **kw)
