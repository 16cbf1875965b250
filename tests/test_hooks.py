"""Hook points, run_with_cache and run_with_hooks: selection, edits, errors, and transforms."""

import pytest
import torch
from torch.func import grad, vmap

import functional_bridge as fb
from helpers import make_gpt2, random_tokens
from tolerance import assert_as_accurate_as, assert_rounding_close, float64, float64_copy


@pytest.fixture(scope="module")
def model():
    hf = make_gpt2()
    return hf, fb.Bridge.from_hf(hf)


def test_hook_names_match_hooked_transformer_layout(model):
    _, bridge = model
    names = fb.hook_names(bridge.cfg)
    assert len(names) == 17 * bridge.cfg.n_layers + 6
    assert names[:3] == ["hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre"]
    assert names[-2:] == ["unembed.hook_in", "unembed.hook_out"]


def test_names_filter_accepts_name_list_and_predicate(model):
    _, bridge = model
    tokens = random_tokens(2, 7, bridge.cfg.d_vocab)
    _, one = fb.run_with_cache(bridge.params, tokens, bridge.cfg, names_filter="blocks.1.attn.hook_pattern")
    assert list(one) == ["blocks.1.attn.hook_pattern"]
    _, some = fb.run_with_cache(bridge.params, tokens, bridge.cfg, names_filter=["hook_embed", "blocks.0.hook_resid_post"])
    assert list(some) == ["hook_embed", "blocks.0.hook_resid_post"]
    _, pred = fb.run_with_cache(bridge.params, tokens, bridge.cfg, names_filter=lambda n: n.endswith("hook_q"))
    assert list(pred) == [f"blocks.{i}.attn.hook_q" for i in range(3)]


def test_cache_values_follow_their_definitions(model):
    """Closed forms: resid_post = resid_mid + mlp_out; pattern rows sum to 1; unembed.hook_in is
    ln_final's output; hook_scale is sqrt(var + eps) of the block input."""
    hf, bridge = model
    tokens = random_tokens(2, 9, bridge.cfg.d_vocab)
    logits, cache = bridge.run_with_cache(tokens)
    scale_of = lambda x: (x.var(-1, unbiased=False, keepdim=True) + bridge.cfg.eps).sqrt()  # noqa: E731
    for layer in range(3):  # each closed form computed in float32 (the oracle) and in float64 (its reference)
        p = f"blocks.{layer}."
        mid, mlp_out = cache[p + "hook_resid_mid"], cache[p + "hook_mlp_out"]
        assert_as_accurate_as(cache[p + "hook_resid_post"], mid + mlp_out, mid.double() + mlp_out.double(), what="resid_post")
        assert_rounding_close(cache[p + "attn.hook_pattern"].sum(-1), torch.ones(2, 4, 9), n=2 * 9, what="pattern sums")
        x = cache[p + "hook_resid_pre"]
        assert_as_accurate_as(cache[p + "ln1.hook_scale"], scale_of(x), scale_of(x.double()), what="hook_scale")
    x = cache["blocks.2.hook_resid_post"]
    with torch.no_grad():
        expected, expected64 = hf.transformer.ln_f(x), float64_copy(hf.transformer.ln_f)(x.double())
    assert_as_accurate_as(cache["unembed.hook_in"], expected, expected64, what="unembed.hook_in")
    assert torch.equal(cache["unembed.hook_out"], logits)
    assert not any(v.requires_grad for v in cache.values())


def test_hook_edit_propagates_and_returning_none_does_not(model):
    hf, bridge = model
    tokens = random_tokens(1, 8, bridge.cfg.d_vocab)
    seen = []
    with torch.no_grad():
        plain = bridge(tokens)
        observed = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: seen.append(hook.name))])
        zeroed = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: torch.zeros_like(x))])
        # oracle: HF with its layer-0 MLP output zeroed by a PyTorch forward hook (and in float64)
        hf64 = float64_copy(hf)
        handles = [m.transformer.h[0].mlp.register_forward_hook(lambda m, i, o: torch.zeros_like(o)) for m in (hf, hf64)]
        try:
            expected, expected64 = hf(tokens).logits, hf64(tokens).logits
        finally:
            for handle in handles:
                handle.remove()
    assert seen == ["blocks.0.hook_mlp_out"]
    assert torch.equal(observed, plain)
    assert_as_accurate_as(zeroed, expected, expected64)


def test_hooks_on_the_same_point_compose_in_order(model):
    _, bridge = model
    tokens = random_tokens(1, 5, bridge.cfg.d_vocab)
    name = "blocks.1.hook_resid_pre"
    _, cache = bridge.run_with_cache(
        tokens, names_filter=name, fwd_hooks=[(name, lambda x, h: x + 1), (name, lambda x, h: x * 3)]
    )
    _, clean = bridge.run_with_cache(tokens, names_filter=name)
    assert_rounding_close(cache[name], (clean[name] + 1) * 3, n=2)  # the same two roundings


def test_unknown_hook_name_names_the_closest(model):
    _, bridge = model
    tokens = random_tokens(1, 5, bridge.cfg.d_vocab)
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.hook_pattern"):
        bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, h: None)])
    with pytest.raises(KeyError, match="stack_head_results"):
        bridge.run_with_cache(tokens, names_filter="blocks.0.attn.hook_result")


def test_hook_returning_wrong_shape_is_named(model):
    _, bridge = model
    tokens = random_tokens(1, 5, bridge.cfg.d_vocab)
    with pytest.raises(ValueError, match="hook_resid_pre.*shape"):
        bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, h: x[..., :3])])


def test_run_with_cache_inside_vmap_and_grad_equals_loop(model):
    _, bridge = model
    params, cfg = {k: v.detach() for k, v in bridge.params.items()}, bridge.cfg
    tokens = random_tokens(3, 6, cfg.d_vocab)
    name = "blocks.1.attn.hook_pattern"

    def pattern_of(p, row):
        return fb.run_with_cache(p, row, cfg, names_filter=name)[1][name][0]

    batched = vmap(pattern_of, in_dims=(None, 0))(params, tokens)
    for row in range(3):
        assert_as_accurate_as(batched[row], pattern_of(params, tokens[row]), pattern_of(float64(params), tokens[row]))

    def edited_loss(p, row):
        logits = fb.run_with_hooks(p, row, cfg, fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, h: 0.5 * x)])
        return logits.logsumexp(-1).mean()

    per_row = vmap(grad(edited_loss), in_dims=(None, 0))(params, tokens)
    for row in range(3):
        expected = torch.func.grad(edited_loss)(params, tokens[row])
        expected64 = torch.func.grad(edited_loss)(float64(params), tokens[row])
        assert_as_accurate_as({key: value[row] for key, value in per_row.items()}, expected, expected64, what=f"row {row}")
