"""fastnn.convert / revert of the real transformers MoE blocks (small random configs, nothing
downloaded): same outputs and gradients, shared parameters, state_dicts both ways, HF's router-logit
outputs and aux loss still working in a whole model."""

import copy

import pytest
import torch

import fastnn
from fastnn import testing

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402


def _config(family, layers=1):
    common = dict(hidden_size=32, num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    if family == "mixtral":
        return MixtralConfig(intermediate_size=40, num_local_experts=6, **common)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=6,
                              norm_topk_prob=False, intermediate_size=48, decoder_sparse_step=1, **common)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(moe_intermediate_size=24, num_experts=8, norm_topk_prob=True, intermediate_size=48,
                              decoder_sparse_step=1, head_dim=8, **common)
    return OlmoeConfig(intermediate_size=24, num_experts=8, norm_topk_prob=False, **common)


def _block(family):
    cfg = _config(family)
    cfg._experts_implementation = "eager"  # the per-expert loop fastnn replaces
    mod = {"mixtral": transformers.models.mixtral.modeling_mixtral,
           "qwen2_moe": transformers.models.qwen2_moe.modeling_qwen2_moe,
           "qwen3_moe": transformers.models.qwen3_moe.modeling_qwen3_moe,
           "olmoe": transformers.models.olmoe.modeling_olmoe}[family]
    cls = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
           "qwen3_moe": "Qwen3MoeSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock"}[family]
    torch.manual_seed(0)
    block = getattr(mod, cls)(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block.double()


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
# Hugging Face routers compute the routing weights in float32 whatever the model's dtype, so a
# float64 block agrees with fastnn (float64 throughout) to float32 precision.
HF = torch.float32


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_same_outputs_and_gradients(family):
    block = _block(family)
    original = copy.deepcopy(block)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    want = original(x)
    params_before = {n: p for n, p in block.named_parameters()}
    fast = fastnn.convert(block)
    assert isinstance(fast, fastnn.MoE) and not isinstance(fast, type(block))
    # The same Parameter objects (an optimizer built before conversion still updates them), same names.
    assert {n: p for n, p in fast.named_parameters()} == params_before
    got = fast(x)
    testing.assert_close(got, want, dtype=HF)
    g = torch.randn_like(want)
    names = [n for n, _ in original.named_parameters()]
    fast_params = dict(fast.named_parameters())
    gw = torch.autograd.grad(want, list(original.parameters()), g)
    gf = torch.autograd.grad(got, [fast_params[n] for n in names], g)
    for name, a, b in zip(names, gf, gw):
        testing.assert_close(a, b, dtype=HF, msg=name)
    back = fastnn.revert(fast)
    assert back is block and type(back) is type(original)
    testing.assert_close(back(x), want, dtype=HF)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_both_ways(family):
    block = _block(family)
    fast = fastnn.convert(copy.deepcopy(block))
    assert set(fast.state_dict()) == set(block.state_dict())
    other = _block(family)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1)
    fast.load_state_dict(other.state_dict())
    block.load_state_dict(fast.state_dict())
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    testing.assert_close(fast(x), other(x), dtype=HF)
    testing.assert_close(block(x), other(x))


def test_whole_model_router_logits_and_aux_loss():
    """A converted MixtralForCausalLM still reports router logits and the same aux loss."""
    cfg = _config("mixtral")
    cfg.output_router_logits = True
    cfg.router_aux_loss_coef = 0.02
    cfg._experts_implementation = "eager"  # HF's grouped_mm path has no float64
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).double().eval()
    ref_model = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 9))
    want = ref_model(input_ids=ids, labels=ids)
    fastnn.convert(model)
    assert any(isinstance(m, fastnn.MoE) for m in model.modules())
    got = model(input_ids=ids, labels=ids)
    testing.assert_close(got.logits, want.logits, dtype=HF)
    testing.assert_close(got.aux_loss, want.aux_loss, dtype=HF)
    assert len(got.router_logits) == len(want.router_logits) == 1
    testing.assert_close(got.router_logits[0], want.router_logits[0], dtype=HF)
    got.loss.backward()
    want.loss.backward()
    ref_params = dict(ref_model.named_parameters())
    for n, a in model.named_parameters():
        testing.assert_close(a.grad, ref_params[n].grad, dtype=HF, msg=n)
    fastnn.revert(model)
    assert not any(isinstance(m, fastnn.MoE) for m in model.modules())


def test_unsupported_activation_is_left_alone_with_a_warning():
    model = torch.nn.ModuleDict({"moe": _block("olmoe"), "ok": _block("mixtral")})
    model["moe"].experts.act_fn = torch.nn.Tanh()
    with pytest.warns(UserWarning, match=r"moe \(.*OlmoeSparseMoeBlock\): the experts' activation Tanh"):
        fastnn.convert(model)
    assert type(model["moe"]).__name__ == "OlmoeSparseMoeBlock" and isinstance(model["ok"], fastnn.MoE)
    from fastnn.integrations.hf_moe import HuggingFaceOlmoeMoE

    with pytest.raises(ValueError, match="block'.*activation Tanh"):  # built directly: a clear error
        HuggingFaceOlmoeMoE(model["moe"])


def test_older_transformers_block_is_left_alone_with_a_warning():
    """A block of an older transformers (experts in a ModuleList) is named in a warning and the report."""
    model = torch.nn.ModuleDict({"layer": _block("mixtral")})
    model["layer"].experts = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(2)])
    out = fastnn.convert.report(model)
    assert [(e.path, e.action) for e in out] == [("layer", "left alone")]
    assert "ModuleList of experts" in out[0].reason
    with pytest.warns(UserWarning, match=r"layer \(.*MixtralSparseMoeBlock\): block of an older transformers"):
        fastnn.convert(model)
    assert not isinstance(model["layer"], fastnn.MoE)


def test_convert_only_named_families():
    names = fastnn.convert.names

    assert {"hf_mixtral", "hf_qwen2_moe", "hf_qwen3_moe", "hf_olmoe"} <= set(names())
    model = torch.nn.ModuleDict({"a": _block("mixtral"), "b": _block("olmoe")})
    fastnn.convert(model, only=["hf_olmoe"])
    assert not isinstance(model["a"], fastnn.MoE) and isinstance(model["b"], fastnn.MoE)
    with pytest.raises(ValueError, match="unknown"):
        fastnn.convert(model, only=["mixtral"])


CAUSAL_LM = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
             "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
LAYERS = 2


def _causal_lm(family, dtype=torch.float64):
    cfg = _config(family, layers=LAYERS)
    cfg.router_aux_loss_coef = 0.02
    cfg._experts_implementation = "eager"  # HF's grouped_mm path has no float64
    torch.manual_seed(0)
    return getattr(transformers, CAUSAL_LM[family])(cfg).to(dtype).eval()


def _check_router_outputs(model, want, ids):
    got = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == LAYERS
    for a, b in zip(got.router_logits, want.router_logits):
        testing.assert_close(a, b, dtype=HF)
    testing.assert_close(got.logits, want.logits, dtype=HF)
    testing.assert_close(got.aux_loss, want.aux_loss, dtype=HF)


# Points of a model's life at which it is converted: what runs before ``fastnn.convert``.
def _plain_forward(model, ids):
    model(input_ids=ids)


def _router_forward(model, ids):  # installs transformers' output capture hooks
    model(input_ids=ids, output_router_logits=True)


def _no_grad_forward(model, ids):
    with torch.no_grad():
        model(input_ids=ids, output_router_logits=True)


LIFE = {"before_forward": lambda model, ids: None, "after_forward": _plain_forward,
        "after_router_forward": _router_forward, "inside_no_grad": _no_grad_forward}


@pytest.mark.parametrize("when", sorted(LIFE))
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_and_revert_at_any_point_keep_router_logits(family, when):
    """output_router_logits and the aux loss work after convert and after revert, whether transformers
    installed its capture hooks before the conversion, while converted, or after the revert."""
    model = _causal_lm(family)
    want = _causal_lm(family)(input_ids=(ids := torch.randint(0, 64, (2, 9))), labels=ids,
                              output_router_logits=True)
    LIFE[when](model, ids)
    if when == "inside_no_grad":
        with torch.no_grad():
            fastnn.convert(model)
    else:
        fastnn.convert(model)
    assert sum(isinstance(m, fastnn.MoE) for m in model.modules()) == LAYERS
    _check_router_outputs(model, want, ids)
    fastnn.revert(model)
    assert not any(isinstance(m, fastnn.MoE) for m in model.modules())
    _check_router_outputs(model, want, ids)
    fastnn.convert(model)
    _check_router_outputs(model, want, ids)


@pytest.mark.parametrize("order", ["to_then_convert", "convert_then_to"])
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_before_or_after_to(family, order):
    """``.to(dtype)`` before or after the conversion: the layer follows the model (a device move is the
    same ``Module._apply``; test_convert_before_or_after_to_cuda moves it to a GPU)."""
    model = _causal_lm(family, torch.float32)
    want = _causal_lm(family)(input_ids=(ids := torch.randint(0, 64, (2, 9))), labels=ids,
                              output_router_logits=True)
    _router_forward(model, ids)
    if order == "to_then_convert":
        fastnn.convert(model.to(torch.float64))
    else:
        fastnn.convert(model).to(torch.float64)
    _check_router_outputs(model, want, ids)
    fastnn.revert(model)
    _check_router_outputs(model, want, ids)


GPU_TOL = torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["to_then_convert", "convert_then_to"])
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_before_or_after_to_cuda(family, order):
    """Moved to the GPU before or after the conversion (float32 there: HF's routers are float32), then
    back: the converted layer runs on the model's device, and revert gives HF's block on it."""
    model = _causal_lm(family, torch.float32)
    ref = _causal_lm(family, torch.float32).cuda()
    ids = torch.randint(0, 64, (2, 9), device="cuda")
    want = ref(input_ids=ids, labels=ids, output_router_logits=True)
    if order == "to_then_convert":
        fastnn.convert(model.cuda())
    else:
        fastnn.convert(model).cuda()
    assert all(p.is_cuda for p in model.parameters())
    got = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(got.router_logits) == LAYERS
    # What is checked is where things run; GPU GEMMs may use TF32, hence the loose tolerance.
    testing.assert_close(got.logits, want.logits, dtype=GPU_TOL, msg="logits")
    testing.assert_close(got.aux_loss, want.aux_loss, dtype=GPU_TOL, msg="aux_loss")
    fastnn.revert(model)
    assert all(p.is_cuda for p in model.parameters())
    got = model.cpu()(input_ids=ids.cpu(), labels=ids.cpu(), output_router_logits=True)
    testing.assert_close(got.logits, want.logits.cpu(), dtype=GPU_TOL, msg="logits after revert")


def test_revert_after_to_that_replaces_parameters():
    """With torch's overwrite-on-conversion switch, ``.to`` gives the converted layer new Parameter
    objects; revert must hand the block those, not the ones it held at conversion."""
    model = _causal_lm("mixtral", torch.float32)
    want = _causal_lm("mixtral")(input_ids=(ids := torch.randint(0, 64, (2, 9))), labels=ids,
                                 output_router_logits=True)
    fastnn.convert(model)
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    _check_router_outputs(model, want, ids)
    fastnn.revert(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    _check_router_outputs(model, want, ids)
