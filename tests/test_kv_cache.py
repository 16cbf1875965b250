"""The functional KV cache: logits of a prompt run in chunks against the cache equal the uncached
forward of the whole sequence, at every step, for every causal family, batched with left padding.
Oracle: our uncached forward (itself checked against HF elsewhere), float64 as the reference."""

from __future__ import annotations

import pytest
import torch

import functional_bridge as fb
from tiny_models import causal_lm_architectures, tiny_model
from tolerance import assert_as_accurate_as, float64

CHUNKS = (5, 1, 2, 1, 1)  # prefill 5 (left-padded), then single tokens and a chunk of 2


def _batch(cfg, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.d_vocab, (3, sum(CHUNKS)), generator=gen)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, :2] = False  # row 1 left-padded by 2, row 2 by 4 (only one real prompt token)
    mask[2, :4] = False
    return tokens, mask


def _cached_logits(params, tokens, mask, cfg):
    cache, out, start = None, [], 0
    for size in CHUNKS:
        chunk = slice(start, start + size)
        logits, cache = fb.forward_with_kv_cache(params, tokens[:, chunk], cfg, kv_cache=cache, attention_mask=mask[:, chunk])
        out.append(logits)
        start += size
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("architecture", causal_lm_architectures())
def test_cached_logits_equal_uncached_forward(architecture):
    bridge = fb.Bridge.from_hf(tiny_model(architecture))
    params, cfg = dict(bridge.params), bridge.cfg
    tokens, mask = _batch(cfg)
    with torch.no_grad():
        ours, cache = _cached_logits(params, tokens, mask, cfg)
        oracle = fb.forward(params, tokens, cfg, attention_mask=mask)
        ref64 = fb.forward(float64(params), tokens, cfg, attention_mask=mask)
    real = mask  # padding positions' logits are garbage on both sides; compare real tokens
    assert_as_accurate_as(ours[real], oracle[real], ref64[real], what=architecture)
    assert cache.mask.shape == mask.shape and torch.equal(cache.mask, mask)
    assert all(k.shape == (3, sum(CHUNKS), cfg.n_kv_heads, cfg.d_head) for k in cache.keys)


def test_cache_is_a_pytree_that_vmaps():
    """Two prompts as an ensemble axis under vmap: each equals its own unbatched run."""
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    params, cfg = dict(bridge.params), bridge.cfg
    tokens = torch.randint(0, cfg.d_vocab, (2, 1, 6), generator=torch.Generator().manual_seed(1))

    def step(t):
        _, cache = fb.forward_with_kv_cache(params, t[:, :5], cfg)
        logits, cache = fb.forward_with_kv_cache(params, t[:, 5:], cfg, kv_cache=cache)
        return logits, cache

    with torch.no_grad():
        vmapped, vcache = torch.func.vmap(step)(tokens)
        for i in range(2):
            alone = fb.forward(params, tokens[i], cfg)[:, 5:]
            alone64 = fb.forward(float64(params), tokens[i], cfg)[:, 5:]
            assert_as_accurate_as(vmapped[i], alone, alone64)
    assert vcache.keys[0].shape == (2, 1, 6, cfg.n_kv_heads, cfg.d_head)


def test_encoder_is_refused_by_name():
    bridge = fb.Bridge.from_hf(tiny_model("BertForMaskedLM"))
    with pytest.raises(NotImplementedError, match="BertForMaskedLM"):
        fb.forward_with_kv_cache(dict(bridge.params), torch.tensor([[1, 2]]), bridge.cfg)


def test_cache_of_wrong_shape_is_refused():
    bridge = fb.Bridge.from_hf(tiny_model("GPT2LMHeadModel"))
    params, cfg = dict(bridge.params), bridge.cfg
    _, cache = fb.forward_with_kv_cache(params, torch.tensor([[1, 2, 3]]), cfg)
    with pytest.raises(ValueError, match="kv_cache layer 0"):
        fb.forward_with_kv_cache(params, torch.tensor([[1], [2]]), cfg, kv_cache=cache)


@pytest.mark.slow
def test_compiled_cached_step_equals_eager():
    """torch.compile takes the cached forward (prefill, then one step against the cache)."""
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    params, cfg = dict(bridge.params), bridge.cfg
    tokens = torch.randint(0, cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(fb.forward_with_kv_cache)
    with torch.no_grad():
        _, cache = compiled(params, tokens[:, :5], cfg)
        ours, _ = compiled(params, tokens[:, 5:], cfg, kv_cache=cache)
        _, cache = fb.forward_with_kv_cache(params, tokens[:, :5], cfg)
        eager, _ = fb.forward_with_kv_cache(params, tokens[:, 5:], cfg, kv_cache=cache)
        ref64 = fb.forward(float64(params), tokens, cfg)[:, 5:]
    assert_as_accurate_as(ours, eager, ref64)
