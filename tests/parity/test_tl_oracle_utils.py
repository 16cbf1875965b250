"""fb.utils against TransformerLens 3.9's utilities on the same inputs: get_act_name over every
shorthand form, to_numpy, get_corner, remove_batch_dim, lm_cross_entropy_loss (with and without
a padding mask, per token), lm_accuracy, and test_prompt's printed report on a Bridge and on a
HookedTransformer with the same weights and tokenizer."""

import re

import numpy as np
import pytest
import torch

import functional_bridge as fb
from test_tl_oracle_facade import family_pair, gpt2_pair
from tolerance import assert_rounding_close, max_abs

pytestmark = pytest.mark.oracle

ACT_NAMES = [
    ("embed",), ("pos_embed",), ("hook_embed",), ("blocks.3.hook_resid_pre",), ("k6",), ("scale4ln1",), ("pre5",),
    ("k", 6, "a"), ("pre", 2), ("normalized", 27, "ln2"), ("scale", 2, "ln2"), ("scale",), ("scale", 1, "ln1"),
    ("resid_pre", 3), ("resid_mid", 0), ("resid_post", 1), ("attn_out", 2), ("mlp_out", 2), ("attn", 1),
    ("attn_logits", 1), ("attn_scores", 0), ("pattern", 0), ("key", 1), ("query", 1), ("value", 1), ("z", 4),
    ("q", 0), ("v", 0), ("rot_q", 1), ("rot_k", 1), ("result", 1), ("mlp_pre", 1), ("mlp_mid", 1), ("mlp_post", 1),
    ("post", 1), ("q_input", 0), ("k_input", 0), ("v_input", 0), ("attn_in", 0), ("mlp_in", 1), ("resid_pre", 0, "b"),
    ("z", "2"),
]  # fmt: skip


@pytest.fixture(scope="module")
def tl_utilities(transformer_lens):
    from transformer_lens import utilities

    return utilities


@pytest.mark.parametrize("args", ACT_NAMES, ids=lambda args: "-".join(map(str, args)))
def test_get_act_name_equals_transformer_lens(tl_utilities, args):
    assert fb.utils.get_act_name(*args) == tl_utilities.get_act_name(*args)


def test_array_helpers_equal_transformer_lens(tl_utilities):
    x = torch.arange(60.0).view(3, 4, 5)
    for value in (x, x.to(torch.bfloat16), torch.nn.Parameter(x), [1, 2], (1.0, 2.0), 3, 2.5, True, "a", x.numpy()):
        ours, theirs = fb.utils.to_numpy(value), tl_utilities.to_numpy(value)
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    with pytest.raises(ValueError):
        fb.utils.to_numpy({"not": "convertible"})
    for n in (1, 2, 3, 7):
        assert torch.equal(fb.utils.get_corner(x, n), tl_utilities.get_corner(x, n))
    for value in (x[:1], x):
        assert torch.equal(fb.utils.remove_batch_dim(value), tl_utilities.remove_batch_dim(value))


@pytest.mark.parametrize("per_token", [False, True])
def test_lm_cross_entropy_loss_and_accuracy_equal_transformer_lens(tl_utilities, per_token):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 13, dtype=torch.float64, generator=generator) * 3
    tokens = torch.randint(0, 13, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    n = 13 + tokens.numel()  # log_softmax's sum over the vocabulary, then the mean
    for attention_mask in (None, mask, mask.bool()):
        ours = fb.utils.lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=per_token)
        theirs = tl_utilities.lm_cross_entropy_loss(logits, tokens, attention_mask, per_token=per_token)
        assert ours.shape == theirs.shape
        assert_rounding_close(ours, theirs, n=n, scale=max_abs(logits), what=f"mask {attention_mask is not None}")
    assert torch.equal(fb.utils.lm_accuracy(logits, tokens, per_token), tl_utilities.lm_accuracy(logits, tokens, per_token))


@pytest.mark.parametrize("answer", ["Mary", [" Mary", " John", " store"], " the store"])
def test_test_prompt_prints_what_transformer_lens_prints(transformer_lens, tl_utilities, capsys, answer):
    """The same report (prompt and answer tokens, ranks, logits, probabilities, top tokens) on
    the float64 pair; TL's rich markup, which rich drops when it prints to a pipe, aside."""
    for bridge, model in (gpt2_pair(transformer_lens), family_pair(transformer_lens)):
        prompt = "When Mary and John went to the store, John gave a drink to"
        with torch.no_grad():
            tl_utilities.test_prompt(prompt, answer, model, top_k=5)
            theirs = capsys.readouterr().out
            fb.utils.test_prompt(prompt, answer, bridge, top_k=5)
            ours = capsys.readouterr().out
        assert "Ranks of the answer tokens:" in theirs
        assert ours.split() == re.sub(r"\[/?b\]", "", theirs).split()
