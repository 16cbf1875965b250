"""The KV cache's fast paths against the uncached forward (itself checked against HF elsewhere),
float64 as the reference: the maskless path (no padding anywhere), sliding-window eviction (the
cache stops growing, logits stay those of the whole sequence past the window), logits_to_keep,
and vmap over an ensemble of models and over K steering strengths, each against a Python loop."""

from __future__ import annotations

import pytest
import torch
import transformers

import functional_bridge as fb
from tiny_models import CONFIGS, causal_lm_architectures, tiny_model
from tolerance import assert_as_accurate_as, float64

WINDOW = 4


def _windowed_mistral():
    """Every layer windowed (sliding_window 4 < the 12 tokens run)."""
    _, fields = CONFIGS["MistralForCausalLM"]
    torch.manual_seed(0)
    config = transformers.MistralConfig(**dict(fields, sliding_window=WINDOW), attn_implementation="eager")
    return transformers.MistralForCausalLM(config).eval()


def _steps(params, tokens, cfg, mask, chunks):
    """Logits of tokens run in chunks against the cache, and the cache's length after each."""
    cache, out, lengths, start = None, [], [], 0
    for size in chunks:
        part = slice(start, start + size)
        kwargs = {} if mask is None else {"attention_mask": mask[:, part]}
        logits, cache = fb.forward_with_kv_cache(params, tokens[:, part], cfg, kv_cache=cache, **kwargs)
        out.append(logits)
        lengths.append(cache.n_positions)
        start += size
    return torch.cat(out, dim=1), cache, lengths


@pytest.mark.parametrize("padded", [False, True], ids=["no_padding", "left_padded"])
def test_sliding_window_cache_stops_growing_and_matches_uncached(padded):
    hf = _windowed_mistral()
    params, cfg = dict(fb.Bridge.from_hf(hf).params), fb.Bridge.from_hf(hf).cfg
    assert fb.kv_cache.evicting_window(cfg) == WINDOW - 1
    chunks = (5, 1, 2, 1, 1, 1, 1)
    tokens = torch.randint(0, cfg.d_vocab, (3, sum(chunks)), generator=torch.Generator().manual_seed(2))
    mask = None
    if padded:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[1, :2] = False
        mask[2, :4] = False
    with torch.no_grad():
        ours, cache, lengths = _steps(params, tokens, cfg, mask, chunks)
        oracle = fb.forward(params, tokens, cfg, attention_mask=mask)
        ref64 = fb.forward(float64(params), tokens, cfg, attention_mask=mask)
        if not padded:  # HF's own forward too, where its window and ours count the same positions
            hf_logits = hf(tokens).logits
            assert_as_accurate_as(oracle, hf_logits, ref64, what="uncached vs HF")
    real = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
    assert_as_accurate_as(ours[real], oracle[real], ref64[real], what=f"windowed cache, padded={padded}")
    assert lengths == [WINDOW - 1] * len(chunks)  # never more than the next query can see
    assert all(k.shape[1] == WINDOW - 1 for k in cache.keys + cache.values)
    assert torch.equal(cache.n_real, real.sum(-1))  # positions keep counting past what was dropped
    assert cache.mask.shape[1] == (WINDOW - 1 if padded else 0)


@pytest.mark.parametrize("architecture", causal_lm_architectures())
def test_maskless_path_equals_uncached_forward(architecture):
    """No attention_mask anywhere: the cache records no padding ([batch, 0] mask), one-token
    steps attend with no mask (learned positions, rotary, windowed layers, every family)."""
    bridge = fb.Bridge.from_hf(tiny_model(architecture))
    params, cfg = dict(bridge.params), bridge.cfg
    chunks = (5, 1, 2, 1, 1)
    tokens = torch.randint(0, cfg.d_vocab, (2, sum(chunks)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, cache, lengths = _steps(params, tokens, cfg, None, chunks)
        oracle = fb.forward(params, tokens, cfg)
        ref64 = fb.forward(float64(params), tokens, cfg)
    assert_as_accurate_as(ours, oracle, ref64, what=architecture)
    assert cache.mask.shape == (2, 0) and lengths[-1] == sum(chunks)


def test_logits_to_keep_slices_and_keeps_final_hooks_whole():
    bridge = fb.Bridge.from_hf(tiny_model("GPT2LMHeadModel"))
    params, cfg = dict(bridge.params), bridge.cfg
    tokens = torch.randint(0, cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(4))
    seen = {}
    hook = [("unembed.hook_in", lambda x, hook: seen.update(shape=x.shape))]
    with torch.no_grad():
        full, _ = fb.forward_with_kv_cache(params, tokens, cfg)
        ref64, _ = fb.forward_with_kv_cache(float64(params), tokens, cfg)
        last, _ = fb.forward_with_kv_cache(params, tokens, cfg, logits_to_keep=1)
        hooked, _ = fb.forward_with_kv_cache(params, tokens, cfg, logits_to_keep=2, hooks=hook)
    assert last.shape == (2, 1, cfg.d_vocab_out) and hooked.shape == (2, 2, cfg.d_vocab_out)
    assert_as_accurate_as(last, full[:, -1:], ref64[:, -1:])  # a BLAS may round one row apart from six
    assert_as_accurate_as(hooked, full[:, -2:], ref64[:, -2:])
    assert seen["shape"] == (2, 6, cfg.d_model)  # a hook after the blocks still sees every position
    with pytest.raises(ValueError, match="logits_to_keep"):
        fb.forward_with_kv_cache(params, tokens, cfg, logits_to_keep=0)


def _prompt(cfg):
    tokens = torch.randint(0, cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, :3] = False
    return tokens, mask


def _prefill_and_two_steps(params, tokens, mask, cfg, hooks=None):
    """Logits of the last two tokens, run one at a time after a prefill of the rest."""
    _, cache = fb.forward_with_kv_cache(params, tokens[:, :5], cfg, attention_mask=mask[:, :5], hooks=hooks)
    first, cache = fb.forward_with_kv_cache(params, tokens[:, 5:6], cfg, kv_cache=cache, hooks=hooks)
    second, cache = fb.forward_with_kv_cache(params, tokens[:, 6:], cfg, kv_cache=cache, hooks=hooks)
    return torch.cat([first, second], dim=1), cache


def test_vmap_over_an_ensemble_equals_a_loop():
    """Two models generating together: vmap over stacked params equals each model run alone."""
    members = [dict(fb.Bridge.from_hf(tiny_model("LlamaForCausalLM", seed=s)).params) for s in (0, 1)]
    cfg = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM")).cfg
    tokens, mask = _prompt(cfg)
    with torch.no_grad():
        vmapped, cache = torch.func.vmap(lambda p: _prefill_and_two_steps(p, tokens, mask, cfg))(fb.stack_params(members))
        for i, member in enumerate(members):
            alone, _ = _prefill_and_two_steps(member, tokens, mask, cfg)
            alone64, _ = _prefill_and_two_steps(float64(member), tokens, mask, cfg)
            assert_as_accurate_as(vmapped[i], alone, alone64, what=f"member {i}")
    assert cache.keys[0].shape == (2, 2, 7, cfg.n_kv_heads, cfg.d_head) and cache.mask.shape == (2, 2, 7)


def test_vmap_over_steering_strengths_equals_a_loop():
    """K steering strengths in one batch: a hook adding alpha * v at a block's output, vmapped
    over alpha, equals the loop over alpha."""
    bridge = fb.Bridge.from_hf(tiny_model("GPT2LMHeadModel"))
    params, cfg = dict(bridge.params), bridge.cfg
    tokens, mask = _prompt(cfg)
    direction = torch.randn(cfg.d_model, generator=torch.Generator().manual_seed(6))
    alphas = torch.tensor([0.0, 0.5, 2.0])

    def steered(p, alpha):
        hook = [("blocks.0.hook_resid_post", lambda resid, hook: resid + alpha * direction.to(resid.dtype))]
        return _prefill_and_two_steps(p, tokens, mask, cfg, hooks=hook)[0]

    with torch.no_grad():
        vmapped = torch.func.vmap(lambda a: steered(params, a))(alphas)
        for i, alpha in enumerate(alphas):
            assert_as_accurate_as(vmapped[i], steered(params, alpha), steered(float64(params), alpha.double()), what=f"alpha {alpha}")
