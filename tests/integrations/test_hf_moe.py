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


def _config(family):
    common = dict(hidden_size=32, num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4,
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


def test_unsupported_activation_is_a_clear_error():
    block = _block("olmoe")
    block.experts.act_fn = torch.nn.Tanh()
    with pytest.raises(ValueError, match="activation"):
        fastnn.convert(block)


def test_convert_only_named_families():
    from fastnn.convert import names

    assert {"hf_mixtral", "hf_qwen2_moe", "hf_qwen3_moe", "hf_olmoe"} <= set(names())
    model = torch.nn.ModuleDict({"a": _block("mixtral"), "b": _block("olmoe")})
    fastnn.convert(model, only=["hf_olmoe"])
    assert not isinstance(model["a"], fastnn.MoE) and isinstance(model["b"], fastnn.MoE)
    with pytest.raises(ValueError, match="unknown conversion"):
        fastnn.convert(model, only=["mixtral"])
