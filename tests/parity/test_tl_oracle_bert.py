"""BERT against TransformerLens 3.9: TL weights vs convert_bert_weights (bitwise), and every cached
activation, hooked forward and stacked weight vs a HookedEncoder built from the same weights.

HookedTransformerConfig is built by hand as TL's loading_from_pretrained maps a BertConfig
(act_fn "gelu", attention_dir "bidirectional"). TL's TokenTypeEmbed has exactly two rows, so
these models have type_vocab_size=2. convert_bert_weights reads a BertForPreTraining (its pooler
and NSP head): a BertForMaskedLM is compared on a BertForPreTraining holding its weights.

Bounds for float32 activations: each activation's error against HookedEncoder in float64, as a
fraction of its scale, is at most 4x the largest such fraction TL's own float32 run shows at
that hook or before it (rounding accumulates along the forward; lookups are exact in both), and
never less than FLOOR_ULPS roundings (TL's run may round exactly where ours rounds once). In
float64 the same bound with float64's epsilon in place of float32's.
"""

import warnings

import pytest
import torch
import transformers

import functional_bridge as fb
from bert_helpers import ARCHITECTURES, bert_batch, hf_logits, make_bert
from helpers import max_diff
from tolerance import FLOOR_ULPS, assert_rounding_close, check, check_above, eps, forward_depth

pytestmark = pytest.mark.oracle

EPS_RATIO = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps


def tl_config(hf, transformer_lens, dtype=torch.float32):
    c = hf.config
    return transformer_lens.HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings,
        eps=c.layer_norm_eps, d_vocab=c.vocab_size, act_fn="gelu", attention_dir="bidirectional",
        original_architecture="BertForMaskedLM", dtype=dtype, device="cpu",
    )  # fmt: skip


def as_pretraining(hf):
    """A BertForPreTraining holding hf's weights (its own pooler and NSP head where hf has none)."""
    if isinstance(hf, transformers.BertForPreTraining):
        return hf
    torch.manual_seed(0)
    twin = transformers.BertForPreTraining(hf.config).to(next(hf.parameters()).dtype).eval()
    missing, unexpected = twin.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                               "cls.seq_relationship.weight", "cls.seq_relationship.bias"}  # fmt: skip
    return twin


def tl_conversion(hf, transformer_lens):
    from transformer_lens.pretrained.weight_conversions.bert import convert_bert_weights

    return convert_bert_weights(as_pretraining(hf), tl_config(hf, transformer_lens))


def hooked_encoder(hf, transformer_lens):
    dtype = next(hf.parameters()).dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = transformer_lens.HookedEncoder(tl_config(hf, transformer_lens, dtype), move_to_device=False)
    missing, unexpected = model.load_state_dict(tl_conversion(hf, transformer_lens), strict=False)
    assert not unexpected and all(name.endswith((".mask", ".IGNORE")) for name in missing)  # buffers
    return model.eval()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tl_weights_equal_convert_bert_weights(architecture, transformer_lens):
    hf = make_bert(architecture, type_vocab_size=2)
    ours = fb.Bridge.from_hf(hf).tl_parameters()
    expected = tl_conversion(hf, transformer_lens)
    absent = {"pooler.W", "pooler.b", "nsp_head.W", "nsp_head.b"} if architecture == "BertForMaskedLM" else set()
    assert list(ours) == [key for key in expected if key not in absent]
    for key, value in ours.items():
        assert value.shape == expected[key].shape and torch.equal(value, expected[key]), key


def _caches(architecture, side, dtype, transformer_lens):
    hf = make_bert(architecture, type_vocab_size=2).to(dtype)
    tokens, mask, types = bert_batch([13, 9, 4, 11], side, n_types=2)
    with torch.no_grad():
        logits, cache = fb.Bridge.from_hf(hf).run_with_cache(tokens, attention_mask=mask, token_type_ids=types)
        tl_logits, tl_cache = hooked_encoder(hf, transformer_lens).run_with_cache(
            tokens, token_type_ids=types, one_zero_attention_mask=mask
        )  # fmt: skip
    return logits, dict(cache.items()), tl_logits, dict(tl_cache.items())


def _relative_errors(cache, reference) -> dict:
    """hook -> max error / max |reference|, over finite entries (masked scores are -inf in both)."""
    out = {}
    for name, value in reference.items():
        finite = value.isfinite()
        assert torch.equal(cache[name].isfinite(), finite), name
        out[name] = max_diff(cache[name][finite], value[finite]) / value[finite].abs().max().item()
    return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_cached_activation_equals_hooked_encoders(architecture, side, transformer_lens):
    logits64, ours64, tl_logits64, tl64 = _caches(architecture, side, torch.float64, transformer_lens)
    logits32, ours32, tl_logits32, tl32 = _caches(architecture, side, torch.float32, transformer_lens)
    assert list(ours64) == list(tl64) == fb.hook_names(fb.Bridge.from_hf(make_bert(architecture, type_vocab_size=2)).cfg)
    for name, value in tl32.items():
        assert ours32[name].shape == value.shape and ours32[name].dtype == value.dtype, name
    ours32["logits"], tl32["logits"], ours64["logits"], tl64["logits"] = logits32, tl_logits32, logits64, tl_logits64
    check_caches_against_tl(ours32, ours64, tl32, tl64)


def check_caches_against_tl(ours32: dict, ours64: dict, tl32: dict, tl64: dict) -> None:
    """The module docstring's bounds, hook by hook in TL's order (logits may be added last)."""
    tl_error = _relative_errors(tl32, tl64)  # TL's own float32 rounding: the yardstick
    errors32, errors64 = _relative_errors(ours32, tl64), _relative_errors(ours64, tl64)
    floor = FLOOR_ULPS * eps(torch.float32)
    worst_so_far = 0.0
    for name in tl64:
        worst_so_far = max(worst_so_far, tl_error[name])
        if tl_error[name] == 0:  # an exact lookup (embeddings): exact in ours too
            assert errors32[name] == errors64[name] == 0, name
        check(errors32[name], max(4 * worst_so_far, floor), f"{name}, float32")
        check(errors64[name], max(4 * worst_so_far, floor) * EPS_RATIO, f"{name}, float64")
    assert worst_so_far > 0  # (the yardstick is not vacuous)


def test_hooked_forward_equals_hooked_encoders(transformer_lens):
    """The same editing hooks (zero a head's z, rescale resid_mid, edit a pattern) give TL's logits."""
    hf = make_bert("BertForMaskedLM", type_vocab_size=2).double()
    tokens, mask, types = bert_batch([13, 9, 4], "right", n_types=2)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def sharpen(pattern, hook):
        return pattern**2 / (pattern**2).sum(-1, keepdim=True).clamp(min=1e-30)

    hooks = [("blocks.1.attn.hook_z", zero_head), ("blocks.0.hook_resid_mid", lambda x, hook: 1.5 * x),
             ("blocks.2.attn.hook_pattern", sharpen), ("embed.hook_token_type_embed", lambda x, hook: -x)]  # fmt: skip
    with torch.no_grad():
        ours = fb.Bridge.from_hf(hf).run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask, token_type_ids=types)
        expected = hooked_encoder(hf, transformer_lens).run_with_hooks(
            tokens, fwd_hooks=hooks, token_type_ids=types, one_zero_attention_mask=mask
        )  # fmt: skip
        plain = hf_logits(hf, tokens, attention_mask=mask, token_type_ids=types)
    n = forward_depth(fb.Bridge.from_hf(hf).cfg, tokens.shape[1])
    assert_rounding_close(ours, expected, n=n, what="hooked logits, float64")
    check_above(max_diff(plain, expected), 0.01 * expected.abs().max().item(), "the hooks change the logits")


def test_stacked_weights_equal_hooked_encoders(transformer_lens):
    hf = make_bert("BertForPreTraining", type_vocab_size=2)
    bridge, model = fb.Bridge.from_hf(hf), hooked_encoder(hf, transformer_lens)
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in", "W_out", "b_out", "W_E", "W_pos", "W_U", "b_U"):
        assert torch.equal(getattr(bridge, name), getattr(model, name)), name
    assert torch.equal(bridge.QK.AB, model.QK.AB) and torch.equal(bridge.OV.AB, model.OV.AB)
