"""ActivationCache: a Mapping and a pytree; its decompositions against closed-form identities of
the forward pass (for every registered family), and never stale after the leaves change."""

from collections.abc import Mapping

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import functional_bridge as fb
from functional_bridge.hooks import layer_hook_names
from helpers import make_gpt2, max_diff, random_tokens
from tiny_models import architectures, tiny_model
from tolerance import assert_as_accurate_as, assert_rounding_close, float64, forward_depth


def close(actual, expected, bridge, what=""):
    """float64 throughout: the identities hold to rounding at the values' magnitude, over the
    forward's accumulated roundings."""
    assert_rounding_close(actual, expected, n=forward_depth(bridge.cfg, 6), what=what)


@pytest.fixture(scope="module", params=architectures())
def family_cache(request):
    bridge = fb.Bridge.from_hf(tiny_model(request.param).double())
    tokens = random_tokens(2, 6, bridge.cfg.d_vocab)
    _, cache = bridge.run_with_cache(tokens)
    return bridge, cache


def test_head_results_sum_with_b_O_to_attn_out(family_cache):
    bridge, cache = family_cache
    tl = bridge.tl_parameters()
    for layer in range(bridge.cfg.n_layers):
        heads = cache.head_results(layer)  # [batch, pos, head, d_model]
        assert heads.shape == (2, 6, bridge.cfg.n_heads, bridge.cfg.d_model)
        b_O = tl.get(f"blocks.{layer}.attn.b_O", torch.zeros((), dtype=torch.float64))
        close(heads.sum(-2) + b_O, cache[f"blocks.{layer}.hook_attn_out"], bridge)
    stacked = cache.stack_head_results()  # [n_layers * n_heads, batch, pos, d_model]
    close(stacked[bridge.cfg.n_heads + 1], cache.head_results(1)[:, :, 1], bridge)


def test_decompositions_sum_to_the_residual_stream(family_cache):
    bridge, cache = family_cache
    n = bridge.cfg.n_layers
    final = cache[f"blocks.{n - 1}.hook_resid_post"]
    close(cache.decompose_resid().sum(0), final, bridge)
    if bridge.cfg.num_experts is None:
        close(cache.get_full_resid_decomposition().sum(0), final, bridge)  # heads, neurons, embeds, biases
    else:  # a mixture of experts has no per-neuron outputs
        with pytest.raises(ValueError, match="expand_neurons=False"):
            cache.get_full_resid_decomposition()
    close(cache.get_full_resid_decomposition(expand_neurons=False).sum(0), final, bridge)
    if "blocks.1.hook_resid_mid" in cache:  # not in parallel attention/MLP blocks
        close(cache.get_full_resid_decomposition(layer=1, mlp_input=True, expand_neurons=bridge.cfg.num_experts is None).sum(0), cache["blocks.1.hook_resid_mid"], bridge)
    close(cache.decompose_resid(layer=1).sum(0), cache["blocks.1.hook_resid_pre"], bridge)
    close(cache.stack_head_results(incl_remainder=True).sum(0), final, bridge)
    accumulated = cache.accumulated_resid()
    assert accumulated.shape == (n + 1, 2, 6, bridge.cfg.d_model)
    assert torch.equal(accumulated[-1], final) and torch.equal(accumulated[0], cache["blocks.0.hook_resid_pre"])


def test_apply_ln_reproduces_the_norms(family_cache):
    """The cached scale applied to the whole stream is the norm's hook_normalized; the logit-lens
    recompute of the final stream is ln_final's output (unembed.hook_in)."""
    bridge, cache = family_cache
    final = cache.accumulated_resid()[-1:]  # [1, batch, pos, d_model]
    close(cache.apply_ln_to_stack(final)[0], cache["ln_final.hook_normalized"], bridge)
    close(cache.accumulated_resid(apply_ln=True)[-1], cache["unembed.hook_in"], bridge)
    pre = cache["blocks.1.hook_resid_pre"][None]
    attn_input_norm = layer_hook_names(bridge.cfg, 1).ln1_normalized  # None: attention reads the stream (OLMo 2)
    expected = pre[0] if attn_input_norm is None else cache[attn_input_norm]
    close(cache.apply_ln_to_stack(pre, layer=1)[0], expected, bridge)
    # the attributions of all components add up to the normalised stream's logit direction
    components = cache.decompose_resid()
    token = 3
    direction = bridge.tl_parameters()["unembed.W_U"][:, token]
    total = cache.logit_attrs(components, token).sum(0)
    close(total, cache["ln_final.hook_normalized"] @ direction, bridge)


def test_mapping_in_execution_order_with_shorthands():
    bridge = fb.Bridge.from_hf(make_gpt2())
    _, cache = bridge.run_with_cache(random_tokens(2, 5, 97))
    assert isinstance(cache, Mapping) and isinstance(cache, fb.ActivationCache)
    assert list(cache) == list(cache.keys()) == fb.hook_names(bridge.cfg) and len(cache) == len(fb.hook_names(bridge.cfg))
    assert [k for k, _ in cache.items()] == list(cache) and len(list(cache.values())) == len(cache)
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["scale4ln1".replace("4", "2")] is cache["blocks.2.ln1.hook_scale"]
    assert cache["scale"] is cache["ln_final.hook_scale"] and cache["k0"] is cache["blocks.0.attn.hook_k"]
    assert "blocks.0.attn.hook_k" in cache and "k0" not in cache  # `in` is exact
    with pytest.raises(KeyError, match="closest"):
        cache["blocks.0.attn.hook_kk"]
    _, plain = fb.run_with_cache(bridge.params, random_tokens(2, 5, 97), bridge.cfg)
    assert type(plain) is dict  # the pure layer keeps returning a dict


def test_new_caches_from_to_remove_batch_dim_and_batch_slices():
    bridge = fb.Bridge.from_hf(make_gpt2())
    _, cache = bridge.run_with_cache(random_tokens(1, 5, 97))
    doubled = cache.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in doubled.values()) and cache["hook_embed"].dtype == torch.float32
    single = cache.remove_batch_dim()
    assert cache.has_batch_dim and not single.has_batch_dim
    assert all(torch.equal(single[k], cache[k][0]) for k in cache)
    with pytest.warns(UserWarning):
        assert single.remove_batch_dim() is single
    _, batch = bridge.run_with_cache(random_tokens(3, 5, 97))
    with pytest.raises(ValueError, match="batch size 1"):
        batch.remove_batch_dim()
    picked = batch.apply_slice_to_batch_dim([0, 2])
    assert picked.has_batch_dim and torch.equal(picked["hook_embed"], batch["hook_embed"][[0, 2]])
    one = batch.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and torch.equal(one["blocks.0.attn.hook_pattern"], batch["blocks.0.attn.hook_pattern"][1])


def test_pytree_and_torch_func():
    bridge = fb.Bridge.from_hf(make_gpt2())
    tokens = random_tokens(3, 5, 97)
    _, cache = bridge.run_with_cache(tokens)
    leaves, spec = optree.tree_flatten(cache, namespace=fb.analysis.PYTREE_NAMESPACE)
    assert len(leaves) == len(cache) and leaves[0] is cache["hook_embed"]
    doubled = optree.tree_map(lambda x: 2 * x, cache, namespace=fb.analysis.PYTREE_NAMESPACE)
    assert isinstance(doubled, fb.ActivationCache) and list(doubled) == list(cache)
    assert torch.equal(doubled["blocks.1.hook_mlp_out"], 2 * cache["blocks.1.hook_mlp_out"])
    assert optree.tree_unflatten(spec, leaves)["hook_embed"] is cache["hook_embed"]
    halved = torch_pytree.tree_map(lambda x: x / 2, cache)
    assert isinstance(halved, fb.ActivationCache) and halved.model is bridge
    assert torch_pytree.tree_flatten_with_path(cache)[0][0][0] == (torch_pytree.MappingKey("hook_embed"),)

    # torch.func transforms return it: vmap over rows equals the batched run
    rows = torch.func.vmap(lambda row: bridge.run_with_cache(row[None])[1])(tokens)
    assert isinstance(rows, fb.ActivationCache)
    _, cache64 = fb.run_with_cache(float64(bridge.params), tokens, bridge.cfg)  # the reference for the batched run
    for name in ("blocks.2.attn.hook_pattern", "ln_final.hook_scale"):
        assert_as_accurate_as(rows[name][:, 0], cache[name], cache64[name], what=name)
    # and grad's aux: the cache of the differentiated run
    params = {k: v.detach() for k, v in bridge.params.items()}

    def loss(p):
        logits, activations = fb.run_with_cache(p, tokens, bridge.cfg, names_filter="blocks.0.hook_resid_post")
        return logits.logsumexp(-1).mean(), fb.ActivationCache(activations, p, cfg=bridge.cfg)

    grads, aux = torch.func.grad(loss, has_aux=True)(params)
    assert isinstance(aux, fb.ActivationCache) and list(aux) == ["blocks.0.hook_resid_post"]
    name = "blocks.0.hook_resid_post"
    assert_as_accurate_as(aux[name], cache[name], cache64[name], what="grad's aux")


def test_analyses_read_the_current_leaves():
    """After run_with_cache, an optimizer step or an edit of the leaves shows in every analysis
    that reads weights: head results are hook_z times the W_O of the leaves as they are now."""
    hf = make_gpt2().double()
    bridge = fb.Bridge.from_hf(hf)
    _, cache = bridge.run_with_cache(random_tokens(2, 5, 97))
    before = cache.head_results(1)
    with torch.no_grad():
        hf.transformer.h[1].attn.c_proj.weight.mul_(-3)
        hf.transformer.wte.weight[:5] += 1
    W_O = bridge.W_O[1]  # [head, d_head, d_model], now
    expected = (cache["blocks.1.attn.hook_z"][..., None] * W_O).sum(-2)  # [batch, pos, head, d_model]
    close(cache.head_results(1), expected, bridge)
    close(cache.head_results(1), -3 * before, bridge)
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, 2)
    close(attrs, (cache.apply_ln_to_stack(stack) * hf.transformer.wte.weight[2]).sum(-1), bridge)


def test_from_params_and_clear_errors():
    bridge = fb.Bridge.from_hf(make_gpt2())
    tokens = random_tokens(1, 4, 97)
    _, activations = fb.run_with_cache(bridge.params, tokens, bridge.cfg)
    cache = fb.ActivationCache(activations, bridge.params, cfg=bridge.cfg)
    _, from_bridge = bridge.run_with_cache(tokens)
    assert max_diff(cache.stack_head_results(), from_bridge.stack_head_results()) == 0
    with pytest.raises(TypeError, match="cfg"):
        fb.ActivationCache(activations, bridge.params)
    _, partial = bridge.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    with pytest.raises(KeyError, match="needs the cached LayerNorm scale 'blocks.1.ln1.hook_scale'"):
        partial.accumulated_resid(layer=1, apply_ln=True)
    with pytest.raises(KeyError, match="blocks.0.hook_attn_out' is not in this cache"):
        partial.decompose_resid()
    with pytest.raises(TypeError, match="tokenizer"):
        from_bridge.logit_attrs(from_bridge.decompose_resid(), " road")
    with pytest.raises(ValueError, match="mode"):
        from_bridge.decompose_resid(mode="heads")
