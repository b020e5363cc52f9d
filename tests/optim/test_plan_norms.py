"""fastnn._C.StepPlan.grad_norms: the per-class gradient norms that the optimizers reduce over a
mesh when they clip DTensor gradients (the classes sort parameters by the process groups their
squared norm is summed over)."""

import pytest
import torch

from fastnn import _extension


@pytest.fixture
def plan():
    ext = _extension.load()
    if ext is None or not hasattr(ext, "StepPlan"):
        pytest.skip("needs the compiled library (fastnn._C.StepPlan)")
    return ext.StepPlan("adam", torch.device("cpu"))


def _groups():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True),
              torch.randn(2, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    for p in params[:3]:  # the last one has no gradient
        p.grad = torch.randn_like(p)
    return params, [{"params": params[:2]}, {"params": params[2:]}]


def test_norm_of_each_class(plan):
    params, groups = _groups()
    norms, on_device = plan.grad_norms(groups, [0, 1, 0, 1], 3, torch.tensor(2.0))
    assert on_device == 4
    want = [torch.cat([params[0].grad.flatten(), params[2].grad.flatten()]).norm() / 2, params[1].grad.norm() / 2, 0]
    torch.testing.assert_close(norms, torch.tensor(want, dtype=torch.float32))


def test_stale_classes_compute_nothing(plan):
    _, groups = _groups()
    norms, on_device = plan.grad_norms(groups, [0, 0], 1)
    assert on_device == 4 and norms is None


@pytest.mark.parametrize("classes, n", [([0, 0, 0, 2], 2), ([0, -1, 0, 0], 2), ([0, 0, 0, 0], 0)])
def test_bad_classes_are_refused(plan, classes, n):
    _, groups = _groups()
    with pytest.raises(ValueError, match="fastnn: argument '(classes|n_classes)'"):
        plan.grad_norms(groups, classes, n)
