"""int8 MoE experts: fastnn.ops.quantized.int8_moe_mlp against its reference (every int8 kernel
variant this CPU runs), fastnn.quantized.MoE against the float fastnn.MoE and the Hugging Face
blocks, state dicts, dequantize, bad input."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastnn
import fastnn.testing as testing
from fastnn import backends
from fastnn.ops import quantized as qops
from fastnn.quantized import MoE as QMoE
from fastnn.quantized import dequantize, quantize_dynamic
from fastnn.reference import moe as ref_moe
from fastnn.reference import quantized as ref

from .helpers import needs_cpu_kernels as _needs_quantized_kernels

VARIANTS = ("default", "avx2", "avx512_vnni")
ACTS = ("silu", "gelu", "gelu_tanh", "relu")
# Against the float layer: as for the other quantized layers (test_modules.py), plus the second,
# requantized product of the expert MLP.
DYNAMIC_BOUND = 0.04
WEIGHT_ONLY_BOUND = 0.015


def needs_cpu_kernels():
    _needs_quantized_kernels()
    if not fastnn._extension.has_kernel("int8_moe_mlp", "CPU"):
        pytest.skip("the loaded library was built without csrc/quantized/qmoe_cpu.cpp")


def rel_err(got, want):
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def op_args(T, H, I, E, k, seed=0, act="silu", capacity_factor=0.0, logits=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    if logits is None:
        logits = torch.randn(T, E, generator=gen)
    g = ref_moe.topk_gating(logits, k, capacity_factor=capacity_factor)
    q1, s1 = ref.quantize_weight(torch.randn(E, 2 * I, H, generator=gen) / max(H, 1) ** 0.5)
    q2, s2 = ref.quantize_weight(torch.randn(E, H, I, generator=gen) / max(I, 1) ** 0.5)
    return [x, g.sorted_slots, g.tokens_per_expert, g.slot_positions, g.weights, q1, s1, q2, s2, act]


def check_matches_reference(args, weight_only):
    got = qops.int8_moe_mlp.call("cpu", *args, weight_only)
    want = qops.int8_moe_mlp.call("reference", *args, weight_only)
    assert got.shape == want.shape == args[0].shape and got.dtype == torch.float32
    scale = float(want.abs().max()) if want.numel() else 1.0
    # relu and weight-only compute the same numbers up to fp32 summation order. The smooth
    # activations are computed with vector approximations (a few ULP): an intermediate value that
    # lands that close to a rounding boundary of its int8 quantization moves by one step.
    exact = weight_only or args[9] == "relu"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=(1e-5 if exact else 5e-3) * max(scale, 1e-3))
    return got, want


@pytest.fixture
def variant(request):
    needs_cpu_kernels()
    name = request.param
    if name not in qops.isas():
        pytest.skip(f"this CPU cannot run the {name} int8 kernels (it runs {qops.isas()})")
    before = qops.set_isa(name)
    yield name
    qops.set_isa(before)


@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("weight_only", [False, True])
@pytest.mark.parametrize("T,H,I,E,k", [(16, 32, 24, 4, 2), (7, 13, 5, 3, 1), (150, 40, 72, 5, 2), (1, 8, 4, 6, 2),
                                       (33, 70, 33, 2, 2)])
def test_op_matches_reference(variant, weight_only, T, H, I, E, k):
    check_matches_reference(op_args(T, H, I, E, k, seed=T + H), weight_only)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("weight_only", [False, True])
def test_activations(act, weight_only):
    needs_cpu_kernels()
    check_matches_reference(op_args(40, 24, 36, 4, 2, act=act), weight_only)


@pytest.mark.parametrize("weight_only", [False, True])
def test_experts_without_tokens_and_empty_batches(weight_only):
    needs_cpu_kernels()
    logits = torch.full((9, 6), -5.0)
    logits[:, 1] = 3.0
    logits[::2, 4] = 4.0
    logits[1::2, 2] = 2.0  # experts 0, 3 and 5 get no token
    args = op_args(9, 20, 12, 6, 2, logits=logits)
    assert (args[2] == 0).sum() == 3
    check_matches_reference(args, weight_only)
    for T in (0,):
        got, _ = check_matches_reference(op_args(T, 20, 12, 6, 2), weight_only)
        assert got.shape == (0, 20)


@pytest.mark.parametrize("weight_only", [False, True])
def test_capacity_overflow_drops_slots(weight_only):
    needs_cpu_kernels()
    logits = torch.randn(40, 4)
    logits[:, 0] += 3.0  # expert 0 is everyone's first choice: over capacity
    args = op_args(40, 16, 24, 4, 2, capacity_factor=0.6, logits=logits)
    assert int(args[2].sum()) < 80  # slots were dropped
    check_matches_reference(args, weight_only)


def test_nan_token_does_not_poison_the_others():
    needs_cpu_kernels()
    args = op_args(12, 16, 8, 3, 2)
    clean = qops.int8_moe_mlp.call("cpu", *args, False)
    args[0] = args[0].clone()
    args[0][5, 3] = float("nan")
    args[0][7, 0] = float("inf")
    got = qops.int8_moe_mlp.call("cpu", *args, False)
    assert torch.isnan(got[5]).all() and torch.isnan(got[7]).all()
    keep = [t for t in range(12) if t not in (5, 7)]
    torch.testing.assert_close(got[keep], clean[keep], rtol=0, atol=0)


def test_compiled_op_checks_what_memory_safety_needs():
    needs_cpu_kernels()
    args = op_args(6, 8, 4, 3, 2)
    op = torch.ops.fastnn.int8_moe_mlp
    bad = list(args)
    bad[1] = args[1].clone()
    bad[1][0] = 12
    with pytest.raises(ValueError, match="sorted_slots"):
        op(*bad, False)
    bad = list(args)
    bad[2] = torch.tensor([12, 1, 0])
    with pytest.raises(ValueError, match="tokens_per_expert"):
        op(*bad, False)
    bad = list(args)
    bad[3] = args[3].clone()
    bad[3][0, 0] = -1
    with pytest.raises(ValueError, match="slot_positions"):
        op(*bad, False)
    bad = list(args)
    bad[7] = args[7][:, :, :3].contiguous()
    with pytest.raises(ValueError, match="down_q"):
        op(*bad, False)
    bad = list(args)
    bad[6] = args[6][:, :4].contiguous()
    with pytest.raises(ValueError, match="gate_up_scale"):
        op(*bad, False)
    bad = list(args)
    bad[9] = "tanh"
    with pytest.raises(ValueError, match="activation"):
        op(*bad, False)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input_is_named(backend):
    if backend == "cpu":
        needs_cpu_kernels()
    args = op_args(6, 8, 4, 3, 2)

    def call(i, value, match, error=ValueError):
        bad = list(args)
        bad[i] = value
        with pytest.raises(error, match=match):
            qops.int8_moe_mlp.call(backend, *bad, False)

    call(0, args[0].double(), "'int8_moe_mlp: x'")
    call(5, args[5].float(), "'int8_moe_mlp: gate_up_q'")
    call(7, args[7][:2], "'int8_moe_mlp: down_q'")
    call(8, args[8][:, :3], "'int8_moe_mlp: down_scale'")
    call(1, torch.zeros(12, dtype=torch.int64), "'int8_moe_mlp: sorted_slots'")
    call(2, torch.tensor([9, 9, 9]), "'int8_moe_mlp: tokens_per_expert'")
    call(4, args[4][:, :1], "'int8_moe_mlp: weights'")
    call(9, "tanh", "'int8_moe_mlp: activation'")
    with pytest.raises(RuntimeError, match="inference-only"):
        qops.int8_moe_mlp.call(backend, args[0].requires_grad_(), *args[1:], False)


def test_opcheck():
    needs_cpu_kernels()
    testing.opcheck(torch.ops.fastnn.int8_moe_mlp.default, (*op_args(10, 16, 8, 4, 2), False))
    testing.opcheck(torch.ops.fastnn.int8_moe_mlp.default, (*op_args(5, 8, 12, 3, 1, act="gelu"), True))


# ---------------------------------------------------------------------------------------------
# The module

@pytest.fixture(params=["reference", "cpu"])
def backend(request):
    if request.param == "cpu":
        needs_cpu_kernels()
    with backends.force(request.param, ops=["int8_moe_mlp", "int8_linear"]):
        yield request.param


MOE_CASES = [
    dict(top_k=2),
    dict(top_k=1, renormalize=False),
    dict(top_k=2, activation="gelu", shared_expert_size=24, shared_expert_gate=True),
    dict(top_k=2, capacity_factor=1.0, selection_bias=True),
    dict(top_k=3, score_func="sigmoid", num_groups=2, topk_groups=1),
]


def float_moe(seed=0, H=32, I=48, E=6, **kw):
    torch.manual_seed(seed)
    return fastnn.MoE(H, I, E, **kw).eval()


@pytest.mark.parametrize("opts", MOE_CASES)
@pytest.mark.parametrize("weight_only", [False, True])
def test_moe_vs_float(backend, opts, weight_only):
    m = float_moe(**opts)
    q = quantize_dynamic(m, weight_only=weight_only)
    assert type(q) is QMoE and type(m) is fastnn.MoE
    assert q.experts.gate_up_proj_q.dtype == torch.int8 and q.experts.gate_up_proj_scale.shape == (6, 96)
    x = torch.randn(3, 17, 32)
    got, want = q(x), m(x)  # no torch.no_grad(): the quantized layer holds no trainable parameter
    assert got.shape == want.shape and not got.requires_grad
    assert rel_err(got, want.detach()) < (WEIGHT_ONLY_BOUND if weight_only else DYNAMIC_BOUND)
    torch.testing.assert_close(q.router_stats["tokens_per_expert"], m.router_stats["tokens_per_expert"])
    assert q(torch.randn(0, 32)).shape == (0, 32)


def test_moe_in_a_model_state_dict_repr_and_dequantize(backend):
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), float_moe(H=64, I=128, E=4, top_k=2, shared_expert_size=64))
    q = quantize_dynamic(model)
    assert isinstance(q[0], fastnn.quantized.Linear) and isinstance(q[1], QMoE)
    assert isinstance(q[1].shared_expert.up_proj, fastnn.quantized.Linear)
    text = repr(q)
    assert "fastnn.quantized.MoE(" in text and "router fp32" in text and "fastnn.quantized.Experts(" in text
    assert "int8 per output channel per expert" in text
    sd = q.state_dict()
    assert sd["1.experts.gate_up_proj_q"].dtype == torch.int8 and sd["1.experts.down_proj_scale"].shape == (4, 64)
    assert sd["1.gate.weight"].dtype == torch.float32 and "1.experts.gate_up_proj" not in sd
    size = lambda d: sum(t.numel() * t.element_size() for t in d.values())  # noqa: E731
    assert size(sd) <= 0.27 * size(model.state_dict())
    buf = io.BytesIO()
    torch.save(sd, buf)
    other = quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 64),
                                                 float_moe(seed=1, H=64, I=128, E=4, top_k=2, shared_expert_size=64)))
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(20, 16)
    torch.testing.assert_close(other(x), q(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="'1.experts.gate_up_proj' is a float weight"):
        other.load_state_dict(model.state_dict())
    back = dequantize(q)
    assert type(back[1]) is fastnn.MoE and isinstance(back[0], torch.nn.Linear)
    assert back[1].experts.gate_up_proj.requires_grad
    with torch.no_grad():
        assert rel_err(back(x), model(x)) < WEIGHT_ONLY_BOUND
        assert rel_err(q(x), model(x)) < DYNAMIC_BOUND


def test_moe_is_inference_only():
    q = quantize_dynamic(float_moe(top_k=2))
    x = torch.randn(4, 32, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x)
    with torch.no_grad():
        assert q(x).shape == (4, 32)
    with pytest.raises(ValueError, match="floating-point"):
        q(torch.ones(4, 32, dtype=torch.int64))


def test_moe_only_selected_by_spec():
    model = torch.nn.ModuleDict({"moe": float_moe(top_k=2), "lin": torch.nn.Linear(4, 4)})
    q = quantize_dynamic(model, {torch.nn.Linear})
    assert type(q["moe"]) is fastnn.MoE and isinstance(q["lin"], fastnn.quantized.Linear)
    q = quantize_dynamic(model, {"moe"})
    assert type(q["moe"]) is QMoE and type(q["lin"]) is torch.nn.Linear


def test_torch_export_and_compile_keep_the_int8_op():
    needs_cpu_kernels()
    q = quantize_dynamic(float_moe(top_k=2, shared_expert_size=16))
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = q(x)
        ep = torch.export.export(q, (x,))
        targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
        assert sum("fastnn.int8_moe_mlp" in t for t in targets) == 1, targets
        torch.testing.assert_close(ep.module()(x), want)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(q, fullgraph=True, backend="eager")(x), want)


@pytest.mark.fuzz
@given(T=st.integers(0, 40), H=st.integers(1, 40), I=st.integers(1, 40), E=st.integers(1, 6),
       k=st.integers(1, 3), act=st.sampled_from(ACTS), weight_only=st.booleans(),
       capacity=st.sampled_from([0.0, 0.5, 1.0]), seed=st.integers(0, 2**16))
def test_fuzz_matches_reference(T, H, I, E, k, act, weight_only, capacity, seed):
    needs_cpu_kernels()
    args = op_args(T, H, I, E, min(k, E), seed=seed, act=act, capacity_factor=capacity)
    check_matches_reference(args, weight_only)


# ---------------------------------------------------------------------------------------------
# Hugging Face blocks converted by fastnn.convert

def _transformers():
    return pytest.importorskip("transformers", reason="the Hugging Face tests need transformers")


def _hf_block(family):
    transformers = _transformers()
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = dict(hidden_size=32, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=40, num_local_experts=6, **common)
        cls = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock
    else:
        cfg = Qwen2MoeConfig(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
                             norm_topk_prob=False, intermediate_size=48, decoder_sparse_step=1, **common)
        cls = transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    block = cls(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_hf_block_converted_then_quantized(family):
    block = _hf_block(family)
    model = torch.nn.ModuleDict({"moe": block})
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        want = block(x)
    fastnn.convert(model)
    q = quantize_dynamic(model)
    assert type(q["moe"]) is QMoE
    assert isinstance(q["moe"].gate, type(block.gate))  # HF's router class: its output hooks still fire
    if family == "qwen2_moe":
        assert isinstance(q["moe"].shared_expert.gate_proj, fastnn.quantized.Linear)
    got = q["moe"](x)
    assert rel_err(got, want) < DYNAMIC_BOUND
    back = dequantize(q)["moe"]
    assert type(back) is fastnn.MoE
    with torch.no_grad():
        assert rel_err(back(x), want) < WEIGHT_ONLY_BOUND


def test_hf_model_router_logits_after_quantization():
    transformers = _transformers()
    from transformers import MixtralConfig

    cfg = MixtralConfig(hidden_size=32, intermediate_size=40, num_local_experts=4, num_experts_per_tok=2,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                        max_position_embeddings=64, output_router_logits=True)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids)
    fastnn.convert(model)
    q = quantize_dynamic(model)
    assert any(isinstance(m, QMoE) for m in q.modules())
    with torch.no_grad():
        got = q(input_ids=ids)
    assert len(got.router_logits) == len(want.router_logits) == 1
    torch.testing.assert_close(got.router_logits[0], want.router_logits[0], rtol=0.05, atol=0.05)
    assert rel_err(got.logits, want.logits) < 0.1  # every Linear of the model is int8 too


# ---------------------------------------------------------------------------------------------
# Weight-only on the GPU: the Triton kernels (run here by the Triton interpreter on CPU tensors)

def needs_triton(args):
    why = qops.int8_moe_mlp.reason("triton", *args, True)
    if why is not None:
        pytest.skip(f"the Triton backend cannot run here: {why}")


@pytest.mark.parametrize("T,H,I,E,k,act,cap", [(9, 20, 12, 4, 2, "silu", 0.5), (5, 33, 17, 3, 1, "gelu", 0.0),
                                               (0, 8, 4, 2, 2, "relu", 0.0), (20, 16, 8, 6, 2, "gelu_tanh", 0.0)])
def test_triton_weight_only_moe_matches_reference(T, H, I, E, k, act, cap):
    args = op_args(T, H, I, E, k, seed=T, act=act, capacity_factor=cap)
    needs_triton(args)
    got = qops.int8_moe_mlp.call("triton", *args, True)
    want = qops.int8_moe_mlp.call("reference", *args, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(float(want.abs().max()) if T else 1.0, 1e-3))


def test_triton_weight_only_linear_matches_reference():
    x = torch.randn(3, 5, 37)
    w, s = ref.quantize_weight(torch.randn(19, 37))
    b = torch.randn(19)
    if qops.int8_linear.reason("triton", x, w, s, b, True) is not None:
        pytest.skip(f"the Triton backend cannot run here: {qops.int8_linear.reason('triton', x, w, s, b, True)}")
    for bias in (b, None):
        torch.testing.assert_close(qops.int8_linear.call("triton", x, w, s, bias, True),
                                   ref.int8_linear(x, w, s, bias, True), rtol=1e-5, atol=1e-5)


def test_triton_is_weight_only():
    args = op_args(4, 8, 4, 2, 2)
    needs_triton(args)
    assert "weight-only" in qops.int8_moe_mlp.reason("triton", *args, False)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_only", [True, False])
def test_quantized_moe_on_cuda(weight_only):
    m = float_moe(top_k=2, shared_expert_size=24, shared_expert_gate=True)
    q = quantize_dynamic(m, weight_only=weight_only).cuda()
    x = torch.randn(2, 33, 32)
    if not weight_only:
        with pytest.raises(NotImplementedError, match="no GPU path"):
            q(x.cuda())
        return
    with backends.force("reference", ops=["int8_moe_mlp", "int8_linear"]):
        want = q.cpu()(x)
    q.cuda()
    with backends.force("triton", ops=["int8_moe_mlp", "int8_linear"]):
        got = q(x.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_float64_moe_quantizes_runs_and_dequantizes_in_its_dtype():
    needs_cpu_kernels()
    from fastnn.quantized import dequantize, quantize_dynamic
    torch.manual_seed(0)
    moe = fastnn.MoE(16, 32, 4, 2).double().eval()
    q = quantize_dynamic(moe)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        out = q(x)
        assert out.dtype == torch.float64
        assert (out - moe(x)).abs().max() < 0.05 * moe(x).abs().max()
        assert dequantize(q).experts.gate_up_proj.dtype == torch.float64
        q32 = quantize_dynamic(fastnn.MoE(16, 32, 4, 2).eval()).double()  # router and bias stay fp32
        assert q32.gate.weight.dtype == torch.float32
        assert q32(torch.randn(3, 16)).dtype == torch.float32 and q32(x).dtype == torch.float64
        with pytest.raises(ValueError, match="floating-point tensor"):
            q(torch.ones(3, 16, dtype=torch.int64))
