"""What generate returns besides tokens, against independent oracles: the activation cache of the
generated sequence (assembled from the generation's own forwards) against run_with_cache on the
final sequence with the same mask and hooks, float64 as the reference; generation from
embeddings against generation from the tokens they embed. TransformerLens 3.9 on embeddings:
parity/test_tl_oracle_generate.py."""

from __future__ import annotations

import pytest
import torch

import functional_bridge as fb
from functional_bridge.hooks import OPTIONAL_HOOKS
from tiny_models import causal_lm_architectures, tiny_model
from tolerance import assert_as_accurate_as, float64

NEW = 5


def _prompt(cfg, seed=0):
    """3 rows, left-padded by 0, 2 and 4 (the last row has 2 real tokens)."""
    tokens = torch.randint(1, cfg.d_vocab, (3, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0
    mask[2, :4] = 0
    return tokens.masked_fill(mask == 0, 0), mask


def _grown(mask, sequence):
    """The generation's mask over the whole sequence: the prompt's, then ones."""
    return torch.cat([mask, torch.ones(mask.shape[0], sequence.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)


def _assert_caches_match(ours, oracle, ref64, what):
    """Same names in the same order; integer activations (expert indices) equal; float ones as
    accurate as the oracle's against float64, each at its own scale; -inf scores at the same places."""
    assert list(ours) == list(oracle) == list(ref64), what
    exact = [name for name, value in oracle.items() if not value.is_floating_point()]
    for name in exact:
        assert torch.equal(ours[name], oracle[name]), name
    floats = lambda cache: {n: v for n, v in cache.items() if n not in exact}  # noqa: E731
    assert_as_accurate_as(floats(ours), floats(oracle), floats(ref64), per_key_scale=True, what=what)


def _every_hook(cfg):
    """Every hook point, the optional ones included (hook_attn_in exists without grouped heads)."""
    return [flag for flag in OPTIONAL_HOOKS if flag != "use_attn_in" or cfg.n_kv_heads == cfg.n_heads]


# every causal family: learned positions (GPT-2), rotary with grouped K/V (Llama...), per-head q/k
# norms as flattened rows (Qwen3), sliding windows and soft-capped scores (Gemma 2), expert routing (Mixtral)
@pytest.mark.parametrize("architecture", causal_lm_architectures())
def test_cache_of_the_generated_sequence_equals_run_with_cache(architecture):
    """Every hook point over prompt + new tokens, left-padded: patterns [batch, head, query, key]
    over the whole sequence, with zeros (scores -inf) where a step had not seen a key yet."""
    bridge = fb.Bridge.from_hf(tiny_model(architecture))
    params, cfg = dict(bridge.params), bridge.cfg
    tokens, mask = _prompt(cfg)
    optional = _every_hook(cfg)
    with torch.no_grad():
        sequence, ours = fb.generate_with_cache(params, tokens, cfg, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                             optional_hooks=optional)  # fmt: skip
        full = _grown(mask, sequence)
        _, oracle = fb.run_with_cache(params, sequence, cfg, attention_mask=full, optional_hooks=optional)
        _, ref64 = fb.run_with_cache(float64(params), sequence, cfg, attention_mask=full, optional_hooks=optional)
    assert sequence.shape == (3, 6 + NEW)
    assert ours["blocks.0.attn.hook_pattern"].shape == (3, cfg.n_heads, 6 + NEW, 6 + NEW)
    _assert_caches_match(ours, oracle, ref64, architecture)


def _steer(vector):
    def hook(resid, hook):
        return resid + vector

    return hook


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_bridge_generate_returns_the_cache_with_hooks_and_names_filter(use_cache):
    """Bridge.generate(return_cache=True): a steering hook acts on every step, names_filter (a
    predicate) selects, rows that stop at eos continue with eos; the ActivationCache equals
    bridge.run_with_cache on the returned tokens with the same mask and hook."""
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    tokens, mask = _prompt(bridge.cfg)
    vector = 3.0 * torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(5))
    hooks = [("blocks.0.hook_resid_post", _steer(vector))]
    wanted = lambda name: name.endswith(("hook_pattern", "hook_resid_pre", "hook_resid_post", "hook_z"))  # noqa: E731
    kwargs = dict(max_new_tokens=NEW, do_sample=False, attention_mask=mask, verbose=False, use_past_kv_cache=use_cache)
    plain = bridge.generate(tokens, stop_at_eos=False, fwd_hooks=hooks, **kwargs)
    eos = int(plain[0, 7])  # row 0's second new token: row 0 stops there
    out, cache = bridge.generate(tokens, eos_token_id=eos, fwd_hooks=hooks, return_cache=True, names_filter=wanted, **kwargs)
    assert isinstance(cache, fb.ActivationCache)
    assert torch.equal(out[0, 7:], torch.full_like(out[0, 7:], eos))
    full = _grown(mask, out)
    with torch.no_grad():
        _, oracle = bridge.run_with_cache(out, attention_mask=full, names_filter=wanted, fwd_hooks=hooks)
        bridge64 = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM").double())
        _, ref64 = bridge64.run_with_cache(out, attention_mask=full, names_filter=wanted,
                                           fwd_hooks=[("blocks.0.hook_resid_post", _steer(vector.double()))])  # fmt: skip
    assert list(cache.keys()) == [n for n in bridge.hook_dict if wanted(n)]
    _assert_caches_match(dict(cache.items()), dict(oracle.items()), dict(ref64.items()), f"use_cache={use_cache}")
    # the facade's cache analyses run on it: the last layer's residual stack over the whole sequence
    assert cache.accumulated_resid(layer=1).shape[-2] == out.shape[1]


def test_cache_sees_an_attached_sae():
    """With an SAE attached, names_filter reaches the SAE's hook points; oracle run_with_cache_with_saes."""
    import functional_bridge.sae as fbsae

    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    tokens, mask = _prompt(bridge.cfg)
    torch.manual_seed(0)
    sae = fbsae.SAE.random(fbsae.SAEConfig(architecture="standard", d_in=bridge.cfg.d_model, d_sae=32, hook_name="blocks.0.hook_resid_post"))
    names = ["blocks.0.hook_resid_post.hook_sae_acts_post", "blocks.1.attn.hook_pattern"]
    with bridge.saes([sae]):
        out, cache = bridge.generate(tokens, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask,
                                     verbose=False, return_cache=True, names_filter=names)  # fmt: skip
    full = _grown(mask, out)
    with torch.no_grad():
        _, oracle = bridge.run_with_cache_with_saes(out, saes=[sae], attention_mask=full, names_filter=names)
        bridge64 = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM").double())
        _, ref64 = bridge64.run_with_cache_with_saes(out, saes=[sae.to(torch.float64)], attention_mask=full, names_filter=names)
    assert cache[names[0]].shape == (3, 6 + NEW, 32)
    _assert_caches_match(dict(cache.items()), dict(oracle.items()), dict(ref64.items()), "sae")


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM", "Gemma2ForCausalLM"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_generating_from_embeddings_equals_generating_from_their_tokens(architecture, use_cache):
    """The prompt's hook_embed activations (TL's model.embed(tokens): scaled for Gemma) given as
    input, left-padded with the same mask: the same new tokens; return_type 'input' gives the
    embeddings of the whole sequence, which are hook_embed of prompt + new tokens."""
    bridge = fb.Bridge.from_hf(tiny_model(architecture))
    tokens, mask = _prompt(bridge.cfg)
    with torch.no_grad():
        _, embedded = bridge.run_with_cache(tokens, names_filter="hook_embed")
    embeds = embedded["hook_embed"]  # [batch, pos, d_model]
    kwargs = dict(max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask, verbose=False, use_past_kv_cache=use_cache)
    from_tokens = bridge.generate(tokens, **kwargs)
    new = bridge.generate(embeds, return_type="tokens", **kwargs)
    assert torch.equal(new, from_tokens[:, tokens.shape[1] :])
    out = bridge.generate(embeds, **kwargs)
    with torch.no_grad():
        _, whole = bridge.run_with_cache(from_tokens, names_filter="hook_embed")
    assert out.shape == (3, 6 + NEW, bridge.cfg.d_model) and torch.equal(out, whole["hook_embed"])
    assert torch.equal(bridge.generate(tokens, return_type="embeds", **kwargs), whole["hook_embed"])


def test_embeddings_are_what_hooks_on_hook_embed_see():
    """A hook on hook_embed sees the given embeddings at the prompt (and may edit them), and the
    cache returned holds them there."""
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    embeds = torch.randn(2, 4, bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [("hook_embed", lambda x, hook: seen.append(x.clone()))]
    _, cache = bridge.generate(embeds, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False, fwd_hooks=hooks,
                               return_cache=True, names_filter="hook_embed")  # fmt: skip
    assert torch.equal(seen[0], embeds) and [s.shape[1] for s in seen] == [4, 1, 1, 1]
    assert torch.equal(cache["hook_embed"][:, :4], embeds)
