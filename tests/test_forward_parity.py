"""forward against the HF model's own forward (eager and sdpa), the independent oracle."""

import pytest
import torch

import functional_bridge as fb
from helpers import GPT2_SMALL, make_gpt2, max_diff, padded_batch, random_tokens
from tolerance import (
    as_accurate_as_bound, assert_as_accurate_as, assert_rounding_close, check, check_above, eps,
    float64_copy, forward_depth,
)  # fmt: skip


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"scale_attn_by_inverse_layer_idx": True},
        {"scale_attn_weights": False},
        {"reorder_and_upcast_attn": True},
        {"activation_function": "gelu"},
        {"activation_function": "relu"},
        {"activation_function": "silu"},
        {"layer_norm_epsilon": 1e-2},
        {"tie_word_embeddings": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
def test_logits_equal_hf_on_small_shapes(attn, overrides):
    hf = make_gpt2(attn=attn, **overrides)
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(3, 17, hf.config.vocab_size)
    with torch.no_grad():
        assert_as_accurate_as(bridge(tokens), hf(tokens).logits, _reference64(hf)(tokens).logits)


def _reference64(hf):
    """The HF model in float64. reorder_and_upcast_attn only changes float32 rounding (HF's eager
    path refuses it in float64), so the reference computes the same math without it."""
    ref = float64_copy(hf)
    for block in ref.transformer.h:
        block.attn.reorder_and_upcast_attn = False
    return ref


def test_deliberately_wrong_scale_is_caught():
    """The perturbed model is sensitive enough that a wrong attention scale fails the parity
    bound by a wide margin (30x)."""
    hf = make_gpt2(scale_attn_by_inverse_layer_idx=True)
    wrong_cfg = fb.config_from_hf(hf.config).replace(scale_attn_by_inverse_layer_idx=False)
    tokens = random_tokens(2, 17, hf.config.vocab_size)
    with torch.no_grad():
        ref64 = float64_copy(hf)(tokens).logits
        bound = as_accurate_as_bound(hf(tokens).logits, ref64)
        check_above(max_diff(fb.forward(dict(hf.named_parameters()), tokens, wrong_cfg), ref64), 30 * bound)


@pytest.fixture(scope="module")
def gpt2_small():
    """The model, tokens, and its logits in float64 (the reference for both attention paths)."""
    hf = make_gpt2(seed=1, **GPT2_SMALL)
    tokens = random_tokens(2, 64, hf.config.vocab_size)
    with torch.no_grad():
        return hf, tokens, float64_copy(hf)(tokens).logits


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_equal_hf_on_gpt2_small_shape(gpt2_small, attn):
    hf, tokens, ref64 = gpt2_small
    hf.set_attn_implementation(attn)
    bridge = fb.Bridge.from_hf(hf)
    with torch.no_grad():
        assert_as_accurate_as(bridge(tokens), hf(tokens).logits, ref64)


def _rows_alone(hf, tokens, mask):
    """The HF oracle for padding: each row's real tokens run alone, unpadded."""
    rows = []
    for row, row_mask in zip(tokens, mask.bool()):
        rows.append(hf(row[row_mask][None]).logits[0])
    return rows


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("path", ["sdpa", "explicit"])
def test_padded_rows_equal_each_row_alone(side, path):
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    tokens, mask = padded_batch(hf.config.vocab_size, [11, 6, 1, 8], side)
    hooks = [(lambda name: name.endswith("hook_pattern"), lambda x, hook: None)] if path == "explicit" else None
    with torch.no_grad():
        logits = bridge(tokens, attention_mask=mask, hooks=hooks)
        assert not logits.isnan().any()
        rows = zip(_rows_alone(hf, tokens, mask), _rows_alone(float64_copy(hf), tokens, mask), mask.bool())
        for row, (alone, alone64, row_mask) in enumerate(rows):
            assert_as_accurate_as(logits[row][row_mask], alone, alone64, what=f"row {row}")


def test_fully_masked_row_has_no_nan_in_forward_or_backward():
    hf = make_gpt2()
    params = dict(hf.named_parameters())
    cfg = fb.config_from_hf(hf.config)
    tokens = random_tokens(2, 6, hf.config.vocab_size)
    mask = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    for hooks in (None, [("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
        logits = fb.forward(params, tokens, cfg, attention_mask=mask, hooks=hooks)
        assert not logits.isnan().any()
        for loss in (logits[0].sum(), logits[1, :2].sum(), logits.sum()):  # the masked row, the padding, all
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True)
            assert not any(g.isnan().any() for g in grads)


def test_sdpa_and_explicit_paths_agree():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(2, 20, hf.config.vocab_size)
    force_explicit = [(lambda name: name.endswith("hook_attn_scores"), lambda x, hook: None)]
    with torch.no_grad():  # the explicit path as the SDPA path's oracle, HF in float64 as the reference
        assert_as_accurate_as(bridge(tokens), bridge(tokens, hooks=force_explicit), float64_copy(hf)(tokens).logits)


def _half_errors(dtype, seed=0):
    """Max abs logit error of ours and of HF (sdpa and eager) run in `dtype`, each against the
    float32 HF result, and one unit of `dtype` rounding at the logits' magnitude ("ulp")."""
    hf = make_gpt2(seed=seed, qk_scale=1.0)
    tokens = random_tokens(2, 24, hf.config.vocab_size, seed=seed)
    with torch.no_grad():
        reference = hf(tokens).logits.double()
        hf.to(dtype)
        bridge = fb.Bridge.from_hf(hf)
        ours = bridge(tokens)
        errors = {"ours": max_diff(ours, reference), "ulp": eps(dtype) * reference.abs().max().item()}
        for attn in ("sdpa", "eager"):
            hf.set_attn_implementation(attn)
            errors[f"hf_{attn}"] = max_diff(hf(tokens).logits, reference)
    assert ours.dtype == dtype
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_float32_as_hf(dtype):
    """Half-precision tolerance, justified: our logits may differ from float32 by no more than the
    better of HF's logits in the same dtype (sdpa, eager) do, up to one unit of that dtype's
    rounding at the logits' magnitude (the output's own last rounding may go either way).
    Closeness to HF's half-precision logits follows (|ours - HF| is at most the two errors
    together): asserting it too, as this test did, could not fail."""
    for seed in range(3):
        e = _half_errors(dtype, seed)
        check(e["ours"] - min(e["hf_sdpa"], e["hf_eager"]), e["ulp"], f"seed {seed}: error over HF's")


def test_float64_is_never_downcast():
    """'At least float32' promotion: a float64 model stays float64 on every path."""
    hf = make_gpt2().double()
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(2, 12, hf.config.vocab_size)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    force_explicit = [(lambda name: name.endswith(("hook_pattern", "hook_scale")), lambda x, hook: None)]
    depth = forward_depth(bridge.cfg, tokens.shape[1])  # one float32 step anywhere would exceed this ~1e6-fold
    with torch.no_grad():
        expected = hf(tokens).logits
        for hooks in (None, force_explicit):
            assert_rounding_close(bridge(tokens, hooks=hooks), expected, n=depth, what="unpadded")
            padded = bridge(tokens, attention_mask=mask, hooks=hooks)
            assert_rounding_close(padded[0, 4:], hf(tokens[:1, 4:]).logits[0], n=depth, what="padded")
