"""ActivationCache: its decompositions against closed-form identities of the forward pass (for
every registered family), its TL-style state changes, its Mapping and pytree faces, and the
weights it reads (the leaves as they are now). The value-by-value comparison with
TransformerLens 3.9 is tests/parity/test_tl_oracle_activation_cache.py."""

import logging
from collections.abc import Mapping

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree

import functional_bridge as fb
from functional_bridge.hooks import layer_hook_names
from helpers import make_gpt2, max_diff, random_tokens
from tiny_models import architectures, causal_lm_architectures, tiny_model
from tolerance import assert_as_accurate_as, assert_rounding_close, float64, forward_depth


def close(actual, expected, bridge, what=""):
    """float64 throughout: the identities hold to rounding at the values' magnitude, over the
    forward's accumulated roundings."""
    assert_rounding_close(actual, expected, n=forward_depth(bridge.cfg, 6), what=what)


def skip_unless_pre_ln(bridge):
    if bridge.cfg.original_architecture not in causal_lm_architectures():
        pytest.skip("a post-LN encoder's residual stream is no sum of components (refused: tests/test_bert.py)")


@pytest.fixture(scope="module", params=architectures())
def family_cache(request):
    bridge = fb.Bridge.from_hf(tiny_model(request.param).double())
    tokens = random_tokens(2, 6, bridge.cfg.d_vocab)
    _, cache = bridge.run_with_cache(tokens)
    return bridge, cache


def projection(bridge, n_outs=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(bridge.cfg.d_model, n_outs, generator=gen, dtype=torch.float64)


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
    assert torch.equal(cache["result", 1], cache.head_results(1))  # cached by stack_head_results, as TL


def test_decompositions_sum_to_the_residual_stream(family_cache):
    bridge, cache = family_cache
    skip_unless_pre_ln(bridge)
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
    if bridge.cfg.num_experts is None:
        close(cache.stack_neuron_results(2, incl_remainder=True, neuron_slice=(0, 9)).sum(0), cache["resid_post", 1], bridge)
    else:
        with pytest.raises(ValueError, match="mixtures of experts"):
            cache.stack_neuron_results(2, incl_remainder=True)
    accumulated = cache.accumulated_resid()
    assert accumulated.shape == (n + 1, 2, 6, bridge.cfg.d_model)
    assert torch.equal(accumulated[-1], final) and torch.equal(accumulated[0], cache["blocks.0.hook_resid_pre"])


def test_projections_equal_the_projected_stacks(family_cache):
    """project_output_onto gives the stack @ p (and, with apply_ln, the normalised stack @ p,
    through the analytic fold that never forms the per-neuron d_model vectors); a [d_model]
    projection squeezes its dim. A mixture of experts: the per-MLP decompositions only."""
    bridge, cache = family_cache
    skip_unless_pre_ln(bridge)
    p = projection(bridge)
    dense = bridge.cfg.num_experts is None
    for apply_ln in (False, True):
        for options in (dict(), dict(expand_neurons=False), dict(layer=1, pos_slice=-1), dict(layer=1, mlp_input=True)):
            options = options if dense else dict(options, expand_neurons=False)
            if options.get("mlp_input") and "blocks.1.hook_resid_mid" not in cache:
                continue
            full = cache.get_full_resid_decomposition(apply_ln=apply_ln, **options)
            projected = cache.get_full_resid_decomposition(apply_ln=apply_ln, project_output_onto=p, **options)
            close(projected, full @ p, bridge, what=str(options))
            one = cache.get_full_resid_decomposition(apply_ln=apply_ln, project_output_onto=p[:, 0], **options)
            assert one.shape == full.shape[:-1]
            close(one, (full @ p)[..., 0], bridge)
        for options in (dict(layer=1), dict(layer=-1, incl_remainder=True, neuron_slice=[4, 0, 9], pos_slice=(1, 4))):
            if not dense:
                break
            stack = cache.stack_neuron_results(apply_ln=apply_ln, **options)
            close(cache.stack_neuron_results(apply_ln=apply_ln, project_output_onto=p, **options), stack @ p, bridge)
    if not dense:
        return
    for neuron in (None, 5):  # an int neuron_slice drops the neuron dim, with or without a projection
        neurons = cache.get_neuron_results(1, neuron_slice=neuron)  # [batch, pos, (n,) d_model]
        close(cache.get_neuron_results(1, neuron_slice=neuron, project_output_onto=p), neurons @ p, bridge)
        close(cache.get_neuron_results(1, neuron_slice=neuron, project_output_onto=p[:, 2]), neurons @ p[:, 2], bridge)
    single = cache.stack_neuron_results(2, neuron_slice=5, return_labels=True)
    assert single[1] == ["L0N5", "L1N5"] and single[0].shape == (2, 2, 6, bridge.cfg.d_model)  # TL fails on an int


def test_stacks_into_block_zero(family_cache):
    """Into block 0 there are no heads or neurons: empty stacks, and the "remainder" is the
    whole stream into block 0, resid_pre (TL reads the final resid_post there)."""
    bridge, cache = family_cache
    skip_unless_pre_ln(bridge)
    for stack in (cache.stack_head_results(0), cache.decompose_resid(0, incl_embeds=False)):
        assert stack.shape == (0, 2, 6, bridge.cfg.d_model)
    stack, labels = cache.stack_head_results(0, incl_remainder=True, return_labels=True)
    assert labels == ["remainder"] and torch.equal(stack[0], cache["resid_pre", 0])
    if bridge.cfg.num_experts is not None:  # no per-neuron stacks, not even an empty one
        with pytest.raises(ValueError, match="mixtures of experts"):
            cache.stack_neuron_results(0)
        return
    assert cache.stack_neuron_results(0).shape == (0, 2, 6, bridge.cfg.d_model)
    stack, labels = cache.stack_neuron_results(0, incl_remainder=True, return_labels=True)
    assert labels == ["remainder"] and torch.equal(stack[0], cache["resid_pre", 0])
    projected = cache.stack_neuron_results(0, incl_remainder=True, apply_ln=True, project_output_onto=projection(bridge))
    expected = cache.apply_ln_to_stack(cache["resid_pre", 0][None], 0) @ projection(bridge)
    close(projected, expected, bridge)


def test_apply_ln_reproduces_the_norms(family_cache):
    """The cached scale applied to the whole stream is the norm's hook_normalized; the logit-lens
    recompute of the final stream is ln_final's output (unembed.hook_in)."""
    bridge, cache = family_cache
    skip_unless_pre_ln(bridge)
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
    assert list(cache) == list(cache.keys()) == list(cache.cache_dict) == fb.hook_names(bridge.cfg)
    assert len(cache) == len(fb.hook_names(bridge.cfg)) and cache.has_embed and cache.has_pos_embed
    assert [k for k, _ in cache.items()] == list(cache) and len(list(cache.values())) == len(cache)
    assert repr(cache) == f"ActivationCache with keys {list(cache)}"
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["scale2ln1"] is cache["blocks.2.ln1.hook_scale"] and cache.get("k0") is cache["blocks.0.attn.hook_k"]
    assert cache["scale"] is cache["ln_final.hook_scale"] and cache["k0"] is cache["blocks.0.attn.hook_k"]
    assert "blocks.0.attn.hook_k" in cache and "k0" not in cache  # `in` is exact, as iterating TL's
    assert cache == cache and cache != fb.ActivationCache(dict(cache.cache_dict), bridge) and hash(cache)  # identity
    with pytest.raises(KeyError, match="closest"):
        cache["blocks.0.attn.hook_kk"]
    with pytest.raises(TypeError, match="tuples"):
        cache[3]
    _, plain = fb.run_with_cache(bridge.params, random_tokens(2, 5, 97), bridge.cfg)
    assert type(plain) is dict  # the pure layer keeps returning a dict
    rotary = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    _, no_positions = rotary.run_with_cache(random_tokens(1, 4, rotary.cfg.d_vocab))
    assert no_positions.has_embed and not no_positions.has_pos_embed
    assert no_positions.decompose_resid(return_labels=True)[1][:2] == ["embed", "0_attn_out"]


def test_state_changes_are_in_place_as_transformer_lens(caplog):
    bridge = fb.Bridge.from_hf(make_gpt2())
    _, cache = bridge.run_with_cache(random_tokens(1, 5, 97))
    entries, embed = cache.cache_dict, cache["hook_embed"]
    assert cache.remove_batch_dim() is cache and not cache.has_batch_dim and cache.cache_dict is entries
    assert torch.equal(cache["hook_embed"], embed[0]) and cache["blocks.0.attn.hook_pattern"].shape == (4, 5, 5)
    with caplog.at_level(logging.WARNING):
        assert cache.remove_batch_dim() is cache
    assert "already having removed it" in caplog.text
    assert cache.to(torch.float64) is cache and all(v.dtype == torch.float64 for v in cache.values())
    assert bridge.dtype == torch.float32
    assert cache.to(torch.float64, move_model=True) is cache and bridge.dtype == torch.float64
    _, batch = bridge.run_with_cache(random_tokens(3, 5, 97))
    with pytest.raises(ValueError, match="batch size 3"):
        batch.remove_batch_dim()
    assert batch.has_batch_dim and batch["hook_embed"].shape[0] == 3  # nothing half-changed
    picked = batch.apply_slice_to_batch_dim([0, 2])
    assert picked is not batch and picked.has_batch_dim and torch.equal(picked["hook_embed"], batch["hook_embed"][[0, 2]])
    one = batch.apply_slice_to_batch_dim(1)
    assert not one.has_batch_dim and torch.equal(one["blocks.0.attn.hook_pattern"], batch["blocks.0.attn.hook_pattern"][1])
    with pytest.raises(ValueError, match="without a batch dim"):
        one.apply_slice_to_batch_dim(0)
    detached = fb.ActivationCache(dict(batch.cache_dict), None)  # TL: "set cache.model = None if unneeded"
    assert torch.equal(detached["k1"], batch["k1"])
    with pytest.raises(ValueError, match="no model"):
        detached.decompose_resid(apply_ln=True)


def test_compute_head_results_adds_entries_once(caplog):
    bridge = fb.Bridge.from_hf(make_gpt2().double())
    _, cache = bridge.run_with_cache(random_tokens(2, 5, 97))
    keys = list(cache)
    cache.compute_head_results()
    added = [f"blocks.{l}.attn.hook_result" for l in range(3)]
    assert list(cache) == keys + added  # appended, as TL does
    for layer, name in enumerate(added):
        expected = torch.einsum("bphd,hdm->bphm", cache["z", layer], bridge.W_O[layer])  # [batch, pos, head, d_model]
        close(cache[name], expected, bridge)
    expected_0 = cache[added[0]][0, 0, 0, 0].item()
    cache[added[0]][0, 0, 0, 0] = float("inf")  # TL's check that nothing is recomputed
    with caplog.at_level(logging.WARNING):
        cache.compute_head_results()
    assert "already cached" in caplog.text and cache[added[0]][0, 0, 0, 0] == float("inf")
    cache[added[0]][0, 0, 0, 0] = expected_0
    stale = fb.ActivationCache({**cache.cache_dict, added[1]: cache[added[1]].sum(-2)}, bridge)  # not per head
    stale.compute_head_results()
    assert torch.equal(stale[added[1]], cache[added[1]])
    partial = fb.ActivationCache({k: v for k, v in cache.items() if k not in added and k != "blocks.2.attn.hook_z"}, bridge)
    with pytest.raises(KeyError, match="hook_z"):
        partial.compute_head_results()
    assert not any(name in partial for name in added)  # all or nothing


def test_no_state_space_layers():
    bridge = fb.Bridge.from_hf(make_gpt2())
    _, cache = bridge.run_with_cache(random_tokens(1, 4, 97))
    assert cache.ssm_layers() == []
    with pytest.raises(RuntimeError, match="No SSM"):
        cache.compute_ssm_state()
    with pytest.raises(TypeError, match="Block 1 has no SSM"):
        cache.compute_ssm_effective_attention(1)


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
    assert isinstance(halved, fb.ActivationCache) and halved.model is bridge and halved.has_pos_embed
    assert torch_pytree.tree_flatten_with_path(cache)[0][0][0] == (torch_pytree.MappingKey("hook_embed"),)
    single = bridge.run_with_cache(tokens[:1])[1].remove_batch_dim()
    assert not torch_pytree.tree_map(lambda x: x, single).has_batch_dim  # the flags travel as metadata

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
    that reads weights: head results are hook_z times the W_O of the leaves as they are now.
    (Head results stored in the cache, by compute_head_results, are activations like the rest.)"""
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
    close(cache.stack_head_results(2)[4:], expected.movedim(-2, 0), bridge)
    stack = cache.decompose_resid()
    attrs = cache.logit_attrs(stack, 2)
    close(attrs, (cache.apply_ln_to_stack(stack) * hf.transformer.wte.weight[2]).sum(-1), bridge)
    neurons = cache.get_neuron_results(0, neuron_slice=[3])
    close(neurons[..., 0, :], cache["post", 0][..., 3:4] * hf.transformer.h[0].mlp.c_proj.weight[3], bridge)


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
    with pytest.raises((TypeError, ValueError), match="tokenizer"):  # the facade's "needs a tokenizer" is a ValueError
        from_bridge.logit_attrs(from_bridge.decompose_resid(), " road")
    with pytest.raises(ValueError, match="mode"):
        from_bridge.decompose_resid(mode="heads")
    with pytest.raises(ValueError, match="no MLP after the final block"):
        from_bridge.get_full_resid_decomposition(mlp_input=True)
