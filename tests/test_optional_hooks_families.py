"""The optional hook points (hook_attn_in, hook_q/k/v_input, attn.hook_result, hook_mlp_in) on
every causal family, whatever its norms sit on (inputs, outputs) and whatever its MLP (dense,
gated, experts): present without changing the forward, and an edit there equals the same edit
made through the default hook points (closed forms of the block's arithmetic). float64 models:
the bounds are float64 rounding over the forward's depth."""

import pytest
import torch

import functional_bridge as fb
from functional_bridge.hooks import layer_hook_names
from helpers import random_tokens
from tiny_models import causal_lm_architectures, tiny_model
from tolerance import assert_rounding_close, forward_depth

OPTIONAL_FIELDS = {
    "use_attn_in": ("attn_in",),
    "use_split_qkv_input": ("q_input", "k_input", "v_input"),
    "use_attn_result": ("result",),
    "use_hook_mlp_in": ("mlp_in",),
}


@pytest.fixture(scope="module", params=causal_lm_architectures())
def bridge_and_tokens(request):
    bridge = fb.Bridge.from_hf(tiny_model(request.param).double())
    return bridge, random_tokens(2, 6, bridge.cfg.d_vocab)


def _names(cfg, field):
    return [getattr(layer_hook_names(cfg, layer), field) for layer in range(cfg.n_layers)]


@pytest.mark.parametrize("flag", sorted(OPTIONAL_FIELDS))
def test_optional_hook_points_leave_the_forward_unchanged(bridge_and_tokens, flag):
    bridge, tokens = bridge_and_tokens
    seen = []
    hooks = [
        (name, lambda x, hook: seen.append(hook.name) or x.clone())
        for field in OPTIONAL_FIELDS[flag]
        for name in _names(bridge.cfg, field)
        if name is not None
    ]
    if not hooks:  # hook_attn_in under grouped-query attention: refused by name (test_tl_facade)
        assert bridge.cfg.n_kv_heads != bridge.cfg.n_heads and flag == "use_attn_in"
        return
    expected = bridge(tokens)
    actual = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    assert sorted(seen) == sorted(name for name, _ in hooks)  # each fired once
    assert_rounding_close(actual, expected, n=forward_depth(bridge.cfg, 6), what=flag)


def test_zeroing_a_heads_result_equals_zeroing_its_z(bridge_and_tokens):
    """attn.hook_result is z @ W_O per head: zeroing head h there is zeroing it at hook_z."""
    bridge, tokens = bridge_and_tokens

    def zero_head(x, hook):
        x = x.clone()
        x[:, :, 1] = 0
        return x

    layer = bridge.cfg.n_layers - 1
    names = layer_hook_names(bridge.cfg, layer)
    via_result = bridge.run_with_hooks(tokens, fwd_hooks=[(names.result, zero_head)])
    via_z = bridge.run_with_hooks(tokens, fwd_hooks=[(names.z, zero_head)])
    assert_rounding_close(via_result, via_z, n=forward_depth(bridge.cfg, 6), what="result vs z")
    plain = bridge(tokens)
    assert (via_z - plain).abs().max() > 1e-6 * plain.abs().max()  # the edit shows, far above float64 rounding

