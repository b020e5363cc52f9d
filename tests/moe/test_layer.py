"""fastnn.MoE against a plain per-expert loop (the Hugging Face eager algorithm), on every backend:
outputs and gradients, router options, shared expert, aux losses and statistics, noise, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fastnn
from fastnn import backends, ops, testing
from fastnn.reference import moe as ref


def loop_moe(m: fastnn.MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer computed the slow obvious way: route with the reference, then loop over experts."""
    h = x.reshape(-1, m.hidden_size)
    logits = F.linear(h, m.gate.weight)
    r = ref.topk_gating(logits, m.top_k, selection_bias=m.e_score_correction_bias, **m.routing)
    out = torch.zeros_like(h)
    act = ref.ACTIVATIONS[m.experts.activation]
    for e in range(m.num_experts):
        tok, j = torch.where(r.expert_ids == e)
        if tok.numel() == 0:
            continue
        gate, up = F.linear(h[tok], m.experts.gate_up_proj[e]).chunk(2, -1)
        y = F.linear(act(gate) * up, m.experts.down_proj[e])
        out = out.index_add(0, tok, y * r.weights[tok, j, None].to(y.dtype))
    if m.shared_expert is not None:
        s = m.shared_expert(h)
        if m.shared_expert_gate is not None:
            s = torch.sigmoid(m.shared_expert_gate(h)) * s
        out = out + s
    return out.reshape(x.shape)


CONFIGS = {
    "mixtral": dict(num_experts=8, top_k=2),
    "qwen2_shared": dict(num_experts=6, top_k=3, renormalize=False, shared_expert_size=24, shared_expert_gate=True),
    "switch_capacity": dict(num_experts=4, top_k=1, renormalize=False, capacity_factor=1.0),
    "deepseek": dict(num_experts=8, top_k=3, score_func="sigmoid", num_groups=4, topk_groups=2,
                     group_score="top2_sum", routed_scaling_factor=2.0, selection_bias=True, shared_expert_size=16),
    "gelu_next_choice": dict(num_experts=4, top_k=2, activation="gelu_pytorch_tanh", capacity_factor=0.75,
                             drop_policy="next_choice"),
}


def _layer(cfg, device, dtype=torch.float64):
    torch.manual_seed(0)
    m = fastnn.MoE(12, 10, device=device, dtype=dtype, **cfg)
    if m.e_score_correction_bias is not None:
        m.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, m.num_experts))
    return m


def _backend_ok(backend, device, dtype, routing=None):
    x = torch.randn(4, 8, device=device, dtype=dtype)
    checks = ((ops.topk_gating, (x, 2), routing or {}),
              (ops.grouped_mm, (x, x.new_zeros(2, 8, 8), torch.ones(2, dtype=torch.long, device=device)), {}))
    for op, args, kw in checks:
        why = op.reason(backend, *args, **kw)
        if why is not None:
            pytest.skip(f"{op.name} on {backend}: {why}")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_matches_loop(backend, device_for, config):
    dtype = torch.float32 if backend == "triton" else torch.float64
    m = _layer(CONFIGS[config], device_for, dtype)
    _backend_ok(backend, device_for, dtype, m.routing)
    x = torch.randn(3, 5, 12, device=device_for, dtype=dtype, requires_grad=True)
    x_before = x.detach().clone()
    with backends.force(backend):
        y = m(x)
    want = loop_moe(m, x)
    testing.assert_close(y, want)
    assert torch.equal(x.detach(), x_before)
    g = torch.randn_like(y)
    params = [x] + [p for p in m.parameters()]
    got = torch.autograd.grad(y, params, g)
    exp = torch.autograd.grad(want, params, g)
    for (name, _), a, b in zip([("x", None)] + list(m.named_parameters()), got, exp):
        testing.assert_close(a, b, msg=name)


def test_empty_batch_and_single_token(backend, device_for):
    _backend_ok(backend, device_for, torch.float32)
    m = _layer(CONFIGS["mixtral"], device_for, torch.float32).eval()
    one = torch.randn(1, 12, device=device_for)
    with backends.force(backend):
        y = m(torch.randn(0, 12, device=device_for))
        assert y.shape == (0, 12)
        assert m.router_stats["tokens_per_expert"].sum() == 0
        y = m(one)
    testing.assert_close(y, loop_moe(m, one))


def test_aux_losses_and_stats():
    m = fastnn.MoE(16, 8, 4, 2, aux_loss_coef=0.01, z_loss_coef=0.001, capacity_factor=0.5)
    x = torch.randn(20, 16)
    m(x)
    logits = F.linear(x, m.gate.weight)
    r = ref.topk_gating(logits, 2, capacity_factor=0.5)
    want = 0.01 * ref.load_balancing_loss(logits, r.tokens_per_expert) + 0.001 * ref.router_z_loss(logits)
    testing.assert_close(m.aux_loss, want)
    m.aux_loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    stats = m.router_stats
    assert torch.equal(stats["tokens_per_expert"], r.tokens_per_expert)
    cap = ref.expert_capacity(20, 4, 2, 0.5)
    assert int(stats["tokens_per_expert"].max()) <= cap
    testing.assert_close(stats["dropped_fraction"], torch.tensor(1 - float(r.tokens_per_expert.sum()) / 40))
    assert 0 < float(stats["routing_entropy"]) <= torch.log(torch.tensor(4.0))


def test_noisy_topk_is_seeded_and_training_only():
    kw = dict(noise_std=1.0, noise_seed=1234)
    a, b = fastnn.MoE(8, 6, 4, 1, **kw), fastnn.MoE(8, 6, 4, 1, **kw)
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 8)
    ya1, ya2 = a(x), a(x)
    yb1 = b(x)
    assert torch.equal(ya1, yb1)  # same seed, same call: same noise
    assert not torch.equal(ya1, ya2)  # the stream moves on
    a.eval()
    testing.assert_close(a(x), loop_moe(a, x))  # no noise in eval


def test_selection_bias_update_balances():
    torch.manual_seed(0)
    m = fastnn.MoE(8, 4, 4, 1, score_func="sigmoid", selection_bias=True)
    x = torch.randn(400, 8)
    with torch.no_grad():
        m.gate.weight[0] += 0.3 * x.mean(0).sign()  # skew: expert 0 is everyone's favourite more often
    m(x)
    before = m.router_stats["tokens_per_expert"].clone()
    m.update_selection_bias(0.01)
    bias = m.e_score_correction_bias
    assert (torch.sign(bias) == torch.sign(before.float().mean() - before.float())).all()
    for _ in range(100):
        m(x)
        m.update_selection_bias(0.01)
    after = m.router_stats["tokens_per_expert"]
    assert after.max() - after.min() < before.max() - before.min()
    assert "e_score_correction_bias" in m.state_dict()
    with pytest.raises(RuntimeError, match="selection_bias=True"):
        fastnn.MoE(8, 4, 4, 1).update_selection_bias()


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k'"):
        fastnn.MoE(8, 4, 4, 5)
    with pytest.raises(ValueError, match="activation'"):
        fastnn.MoE(8, 4, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="num_experts'"):
        fastnn.MoE(8, 4, 0, 1)
    with pytest.raises(ValueError, match="shared_expert_gate'"):
        fastnn.MoE(8, 4, 4, 1, shared_expert_gate=True)
    m = fastnn.MoE(8, 4, 4, 2)
    with pytest.raises(ValueError, match="'hidden_states'.*8"):
        m(torch.randn(3, 7))
    with pytest.raises(ValueError, match="'hidden_states'.*float32"):
        m(torch.randn(3, 8, dtype=torch.float64))


def test_bf16_error_bounded():
    m = fastnn.MoE(64, 48, 4, 2)
    x = torch.randn(40, 64)
    exact = loop_moe(m.double(), x.double())
    m16 = m.to(torch.bfloat16)
    got = m16(x.bfloat16())
    torch_lp = loop_moe(m16, x.bfloat16())
    testing.assert_error_bounded(got, exact, torch_lp, floor=1e-3, msg="MoE bf16")


def test_state_dict_names_match_hugging_face_layout():
    m = fastnn.MoE(8, 4, 4, 2, shared_expert_size=6, shared_expert_gate=True)
    assert set(m.state_dict()) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj",
                                   "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight",
                                   "shared_expert.down_proj.weight", "shared_expert_gate.weight"}
    assert m.experts.gate_up_proj.shape == (4, 8, 8) and m.experts.down_proj.shape == (4, 8, 4)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_inference_matches_loop(backend, device_for, config):
    """Under no_grad the layer takes the fused moe_mlp op (CPU, Triton); same numbers as the loop."""
    m = _layer(CONFIGS[config], device_for, torch.float32)
    _backend_ok(backend, device_for, torch.float32, m.routing)
    x = torch.randn(3, 50, 12, device=device_for)
    with torch.no_grad(), backends.force(backend):
        y = m(x)
    with torch.no_grad():
        want = loop_moe(m, x)
    testing.assert_close(y, want)


def test_a_layer_that_ran_with_autograd_can_be_copied_and_quantized():
    import copy

    moe = fastnn.MoE(8, 16, 4, 2, aux_loss_coef=0.01)
    moe(torch.randn(3, 8)).sum().backward()  # leaves non-leaf aux_loss / router_logits on the module
    twin = copy.deepcopy(moe)
    assert twin.aux_loss is None and twin.router_logits is None and moe.aux_loss is not None
    x = torch.randn(5, 8)
    torch.testing.assert_close(twin(x), moe(x))
    q = fastnn.quantize_dynamic(moe.eval())
    assert q(x).shape == (5, 8)
