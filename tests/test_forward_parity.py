"""forward against the HF model's own forward (eager and sdpa), the independent oracle."""

import pytest
import torch

import functional_bridge as fb
from helpers import GPT2_SMALL, make_gpt2, max_diff, padded_batch, random_tokens


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
        assert max_diff(bridge(tokens), hf(tokens).logits) <= 1e-5


def test_deliberately_wrong_scale_is_caught():
    """The perturbed model is sensitive enough that a wrong attention scale fails the 1e-5
    parity bound by a wide margin."""
    hf = make_gpt2(scale_attn_by_inverse_layer_idx=True)
    wrong_cfg = fb.config_from_hf(hf.config).replace(scale_attn_by_inverse_layer_idx=False)
    tokens = random_tokens(2, 17, hf.config.vocab_size)
    with torch.no_grad():
        assert max_diff(fb.forward(dict(hf.named_parameters()), tokens, wrong_cfg), hf(tokens).logits) > 5 * 1e-5


@pytest.fixture(scope="module")
def gpt2_small():
    return make_gpt2(seed=1, **GPT2_SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_equal_hf_on_gpt2_small_shape(gpt2_small, attn):
    hf = gpt2_small
    hf.set_attn_implementation(attn)
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(2, 64, hf.config.vocab_size)
    with torch.no_grad():
        assert max_diff(bridge(tokens), hf(tokens).logits) <= 1e-4


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
        for row, (alone, row_mask) in enumerate(zip(_rows_alone(hf, tokens, mask), mask.bool())):
            assert max_diff(logits[row][row_mask], alone) <= 1e-5


def test_fully_masked_row_has_no_nan_in_forward_or_backward():
    hf = make_gpt2()
    params = dict(hf.named_parameters())
    cfg = fb.config_from_hf(hf.config)
    tokens = random_tokens(2, 6, hf.config.vocab_size)
    mask = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    for hooks in (None, [("blocks.0.attn.hook_pattern", lambda x, hook: None)]):
        logits = fb.forward(params, tokens, cfg, attention_mask=mask, hooks=hooks)
        assert not logits.isnan().any()
        grads = torch.autograd.grad(logits[1, 2:].sum(), list(params.values()))
        assert not any(g.isnan().any() for g in grads)


def test_sdpa_and_explicit_paths_agree():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(2, 20, hf.config.vocab_size)
    force_explicit = [(lambda name: name.endswith("hook_attn_scores"), lambda x, hook: None)]
    with torch.no_grad():
        assert max_diff(bridge(tokens), bridge(tokens, hooks=force_explicit)) <= 1e-5


def _half_errors(dtype, seed=0):
    """Max abs logit error of ours and of HF (sdpa and eager) run in `dtype`, each against the
    float32 HF result, plus ours against HF in the same dtype."""
    hf = make_gpt2(seed=seed, qk_scale=1.0)
    tokens = random_tokens(2, 24, hf.config.vocab_size, seed=seed)
    with torch.no_grad():
        reference = hf(tokens).logits.double()
        hf.to(dtype)
        bridge = fb.Bridge.from_hf(hf)
        ours = bridge(tokens)
        errors = {"ours": max_diff(ours, reference)}
        for attn in ("sdpa", "eager"):
            hf.set_attn_implementation(attn)
            theirs = hf(tokens).logits
            errors[f"hf_{attn}"] = max_diff(theirs, reference)
            errors[f"ours_vs_hf_{attn}"] = max_diff(ours, theirs)
    assert ours.dtype == dtype
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_float32_as_hf(dtype):
    """Half-precision tolerance, justified: our logits may differ from float32 by no more than
    HF's default (sdpa) logits in the same dtype do (1.25x, for rounding luck), and from HF's
    (sdpa and eager) by no more than the two errors together."""
    for seed in range(3):
        e = _half_errors(dtype, seed)
        assert e["ours"] <= 1.25 * e["hf_sdpa"], e
        for attn in ("sdpa", "eager"):
            assert e[f"ours_vs_hf_{attn}"] <= e["ours"] + e[f"hf_{attn}"], e


def test_float64_is_never_downcast():
    """'At least float32' promotion: a float64 model stays float64 on every path."""
    hf = make_gpt2().double()
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(2, 12, hf.config.vocab_size)
    mask = torch.ones_like(tokens)
    mask[0, :4] = 0
    force_explicit = [(lambda name: name.endswith(("hook_pattern", "hook_scale")), lambda x, hook: None)]
    with torch.no_grad():
        expected = hf(tokens).logits
        for hooks in (None, force_explicit):
            assert max_diff(bridge(tokens, hooks=hooks), expected) <= 1e-12
            padded = bridge(tokens, attention_mask=mask, hooks=hooks)
            assert max_diff(padded[0, 4:], hf(tokens[:1, 4:]).logits[0]) <= 1e-12
