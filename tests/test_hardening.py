"""Regression tests for silent wrong results and unclear errors an adversarial review found
(issue 11, items 1-12). Each failed before its fix. Behavioural comparisons run in float64,
where a real bug shows as ~1e-2 and rounding as ~1e-15 relative to the logits."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from torch import nn

import functional_bridge as fb
from helpers import make_gpt2, padding_mask, random_tokens
from tiny_models import tiny_model
from tolerance import assert_rounding_close, forward_depth


def assert_same_logits(ours: torch.Tensor, reference: torch.Tensor, cfg, float32_frequencies: bool = False):
    """Float64 logits of the same model computed two ways: equal up to float64 rounding over the
    forward's depth (tests/tolerance.py; a wrong setting shows as ~1e-2 of the scale). HF builds
    its rotary inverse frequencies in float32 even in a float64 model: with float32_frequencies
    each angle is off by up to pos * eps32 of itself, so float32 rounding accumulated linearly
    over the positions (n = pos^2 under rounding_bound's square root)."""
    assert ours.dtype == reference.dtype == torch.float64
    if float32_frequencies:
        assert_rounding_close(ours, reference, dtype=torch.float32, n=ours.shape[-2] ** 2, what="float32 frequencies")
    else:
        assert_rounding_close(ours, reference, n=forward_depth(cfg, ours.shape[-2]))


# 1. the model's class decides the family ---------------------------------------------------


def test_the_model_class_decides_the_family_not_config_architectures():
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40, sliding_window=3, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config).double().eval()
    model.set_attn_implementation("eager")
    bridge = fb.Bridge.from_hf(model)
    assert bridge.cfg.original_architecture == "MistralForCausalLM" and bridge.cfg.window_size == 3
    tokens = random_tokens(2, 12, 97)
    with torch.no_grad():
        assert_same_logits(bridge(tokens), model(tokens).logits, bridge.cfg, float32_frequencies=True)
    assert bridge.hf_config.architectures == ["MistralForCausalLM"]


def test_a_gpt2_lm_head_model_whose_config_names_gpt2model_is_accepted():
    model = make_gpt2(attn="eager").double()
    model.config.architectures = ["GPT2Model"]
    bridge = fb.Bridge.from_hf(model)
    tokens = random_tokens(2, 9, 97)
    with torch.no_grad():
        assert_same_logits(bridge(tokens), model(tokens).logits, bridge.cfg)


def test_from_config_builds_the_class_the_config_describes():
    config = transformers.MistralConfig(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=40, sliding_window=3, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    assert fb.Bridge.from_config(config).cfg.original_architecture == "MistralForCausalLM"


# 2. attention-mask values: any nonzero value is a real token, as in HF ----------------------


@pytest.mark.parametrize("value", [2, -1, 7])
def test_any_nonzero_mask_value_means_a_real_token(value):
    bridge = fb.Bridge.from_hf(make_gpt2().double())
    tokens = random_tokens(3, 30, 97)  # longer than n_ctx / 2 = 20: a doubled position overflowed
    mask = padding_mask([30, 21, 12], "left")
    with torch.no_grad():
        expected = bridge(tokens, attention_mask=mask)
        assert torch.equal(bridge(tokens, attention_mask=mask * value), expected)
        assert torch.equal(bridge(tokens, attention_mask=mask.bool()), expected)


# 3. hf_config always describes the leaves -------------------------------------------------


def _rebuilt_from_hf_config(bridge: fb.Bridge) -> nn.Module:
    model = transformers.AutoModelForCausalLM.from_config(bridge.hf_config).double().eval()
    model.load_state_dict(bridge.state_dict())
    return model


@pytest.mark.parametrize("untie", ["set_tl_weights", "processed"])
def test_hf_config_follows_an_untied_head(untie):
    bridge = fb.Bridge.from_hf(make_gpt2(attn="eager").double())
    assert bridge.hf_config.tie_word_embeddings
    if untie == "set_tl_weights":
        W_U = bridge.tl_parameters()["unembed.W_U"]
        bridge.set_tl_weights({"unembed.W_U": W_U + 0.3 * torch.randn_like(W_U)})
    else:
        bridge = bridge.processed(fold_ln=False, center_writing_weights=False, fold_value_biases=False)
    assert "lm_head.weight" in bridge.params
    assert bridge.hf_config.tie_word_embeddings is False
    tokens = random_tokens(2, 9, 97)
    with torch.no_grad():
        assert_same_logits(bridge(tokens), _rebuilt_from_hf_config(bridge)(tokens).logits, bridge.cfg)


def test_hf_config_is_a_copy():
    bridge = fb.Bridge.from_hf(make_gpt2())
    bridge.hf_config.n_layer = 99
    assert bridge.hf_config.n_layer == 3


# 4. to_hf does not change how other threads build modules ---------------------------------


def test_to_hf_leaves_other_threads_parameters_alone():
    bridge = fb.Bridge.from_hf(make_gpt2())
    original = nn.Module.register_parameter
    stop, meta_weights, built = threading.Event(), [], [0]

    def build_linears():
        while not stop.is_set():
            layer = nn.Linear(4, 4)
            built[0] += 1
            if layer.weight.is_meta:
                meta_weights.append(layer)

    worker = threading.Thread(target=build_linears)
    worker.start()
    try:
        for _ in range(30):
            bridge.to_hf()
    finally:
        stop.set()
        worker.join()
    assert built[0] > 0 and meta_weights == []
    assert nn.Module.register_parameter is original


# 5. a hook returning another dtype is named -----------------------------------------------


def test_a_hook_returning_another_dtype_is_named():
    bridge = fb.Bridge.from_hf(make_gpt2())
    with pytest.raises(TypeError, match=r"hook on 'blocks.1.hook_resid_pre' returned a torch.float64 tensor.*float32"):
        bridge.run_with_hooks(random_tokens(1, 5, 97), fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: x.double())])


# 6. leaves of mixed dtypes: the forward says so -------------------------------------------


def test_mixed_dtype_leaves_are_reported_by_the_forward():
    bridge = fb.Bridge.from_hf(make_gpt2())
    bridge.load_state_dict({"transformer.ln_f.weight": bridge.params["transformer.ln_f.weight"].double()}, strict=False, assign=True)
    with pytest.raises(ValueError, match="params have mixed dtypes: torch.float32 .*torch.float64 \\(e.g. transformer.ln_f.weight\\)"):
        bridge(random_tokens(1, 5, 97))


# 7. token dtypes and 1-D tokens with a 2-D mask --------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_tokens_are_token_ids(dtype):
    bridge = fb.Bridge.from_hf(make_gpt2())
    tokens = random_tokens(2, 6, 97)
    with torch.no_grad():
        assert torch.equal(bridge(tokens.to(dtype)), bridge(tokens))


def test_one_dimensional_tokens_take_a_one_row_mask():
    bridge = fb.Bridge.from_hf(make_gpt2())
    tokens, mask = random_tokens(1, 6, 97), padding_mask([4, 6], "left")[:1]
    with torch.no_grad():
        assert torch.equal(bridge(tokens[0], attention_mask=mask), bridge(tokens, attention_mask=mask))
    with pytest.raises(ValueError, match=r"got tokens \(6,\), attention_mask \(1, 5\)"):
        bridge(tokens[0], attention_mask=mask[:, :5])


# 8. second-order gradients on the default path ---------------------------------------------


def test_second_order_gradients_equal_hf_eager():
    model = make_gpt2(attn="eager").double()
    bridge = fb.Bridge.from_hf(model)  # shares the HF model's leaves
    tokens = random_tokens(2, 8, 97)
    W = bridge.params["transformer.h.0.attn.c_attn.weight"]

    def gradient_penalty_grad(logits_fn):
        loss = fb.next_token_loss(logits_fn(tokens), tokens)
        (g,) = torch.autograd.grad(loss, W, create_graph=True)
        (second,) = torch.autograd.grad(g.square().sum(), W)
        return second

    ours = gradient_penalty_grad(bridge)
    hf = gradient_penalty_grad(lambda t: model(t).logits)
    # float64 rounding over a forward and two backward passes
    assert_rounding_close(ours, hf, n=3 * forward_depth(bridge.cfg, tokens.shape[1]) + tokens.numel())


# 9. TL entries no leaf stores refuse in-place writes ---------------------------------------


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM", "GPTNeoXForCausalLM"])
def test_every_tl_entry_is_a_writable_view_or_refuses_writes(architecture):
    bridge = fb.Bridge.from_hf(tiny_model(architecture))
    refused = []
    with torch.no_grad():
        for key, value in bridge.tl_parameters().items():
            before = value.clone()
            try:
                value.add_(1.0)
            except RuntimeError as error:
                assert key in str(error) and "set_tl_weights" in str(error)
                refused.append(key)
                continue
            assert torch.equal(bridge.tl_parameters()[key], before + 1.0), f"{key}: a write that did not persist"
            value.sub_(1.0)
    if architecture == "LlamaForCausalLM":  # zero q bias, expanded grouped-query keys
        assert {"blocks.0.attn.b_Q", "blocks.0.attn.W_K", "blocks.0.attn.b_V"} <= set(refused)


def test_derived_entries_refuse_writes_through_views_and_stay_differentiable():
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    W_K = bridge.tl_parameters()["blocks.0.attn.W_K"]  # grouped-query keys, expanded: a copy
    with torch.no_grad(), pytest.raises(RuntimeError, match="blocks.0.attn.W_K"):
        W_K[0].zero_()
    with torch.no_grad(), pytest.raises(RuntimeError, match="W_Q"):
        bridge.W_Q[0, 1] = 0.0
    (W_K * 2).sum().backward()
    k_proj = bridge.params["model.layers.0.self_attn.k_proj.weight"]
    assert torch.equal(k_proj.grad, torch.full_like(k_proj, 2.0 * 2))  # each kv head serves 2 query heads
    assert type(W_K + 1) is torch.Tensor


# 10. a NaN parameter gives NaN on both attention paths, as HF eager ------------------------


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nan_in_an_attention_weight_reaches_the_logits_on_both_paths(which):
    model = make_gpt2(attn="eager")
    column = 5 + 48 * "qkv".index(which)
    with torch.no_grad():
        model.transformer.h[1].attn.c_attn.weight[3, column] = float("nan")
    bridge = fb.Bridge.from_hf(model)
    tokens, mask = random_tokens(2, 7, 97), padding_mask([7, 4], "left")
    explicit = [("blocks.1.attn.hook_pattern", lambda pattern, hook: None)]
    with torch.no_grad():
        hf = model(tokens).logits.isnan()
        assert hf.all()
        assert torch.equal(bridge(tokens).isnan(), hf) and torch.equal(bridge(tokens, hooks=explicit).isnan(), hf)
        real = mask.bool()
        fused = bridge(tokens, attention_mask=mask).isnan()[real]
        hooked = bridge(tokens, attention_mask=mask, hooks=explicit).isnan()[real]
    assert fused.all() and hooked.all()


# 11. a row with no real token: z is zero, the logits finite (the README's claim) -----------


def test_a_row_with_no_real_token_has_zero_z_and_finite_logits():
    bridge = fb.Bridge.from_hf(make_gpt2())
    tokens, mask = random_tokens(2, 6, 97), padding_mask([6, 0], "left")
    logits, cache = bridge.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith("hook_z"))
    for name, z in cache.items():
        assert torch.equal(z[1], torch.zeros_like(z[1])), name
    assert logits.isfinite().all()


# 12. load_state_dict names a value that is not a tensor ------------------------------------


def test_load_state_dict_names_a_non_tensor_value_and_changes_nothing():
    bridge = fb.Bridge.from_hf(make_gpt2())
    before = {k: v.clone() for k, v in bridge.params.items()}
    bad = {**{k: torch.zeros_like(v) for k, v in bridge.params.items()}, "transformer.ln_f.bias": [0.0] * 48}
    with pytest.raises(fb.ParamsStructureError, match="transformer.ln_f.bias is a list, not a tensor"):
        bridge.load_state_dict(bad)
    assert all(torch.equal(v, before[k]) for k, v in bridge.params.items())
