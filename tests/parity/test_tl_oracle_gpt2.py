"""TL weights and every cached activation against TransformerLens 3.9 itself (the oracle)."""

import pytest
import torch

import functional_bridge as fb
from helpers import assert_caches_equal, hooked_float64, make_gpt2, max_diff, padding_mask, random_tokens
from tolerance import assert_as_accurate_as

pytestmark = pytest.mark.oracle


def tl_config(hf, transformer_lens):
    c = hf.config
    return transformer_lens.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        use_attn_scale=c.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
    )  # fmt: skip


def tl_conversion(hf, transformer_lens):
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    return convert_gpt2_weights(hf, tl_config(hf, transformer_lens))


def hooked_transformer(hf, transformer_lens):
    """HookedTransformer built from the same HF weights, no processing."""
    model = transformer_lens.HookedTransformer(tl_config(hf, transformer_lens))
    state = dict(tl_conversion(hf, transformer_lens))  # TL pops keys from the dict it is given
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def assert_tl_weights_equal_conversion(bridge, hf, transformer_lens):
    expected = tl_conversion(hf, transformer_lens)
    ours = bridge.tl_parameters()
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert ours[name].shape == value.shape, name
        assert torch.equal(ours[name], value), name


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}])
def test_tl_weights_equal_convert_gpt2_weights(transformer_lens, overrides):
    hf = make_gpt2(**overrides)
    bridge = fb.Bridge.from_hf(hf)
    assert_tl_weights_equal_conversion(bridge, hf, transformer_lens)


def test_tl_weights_are_differentiable_views_of_the_leaves():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    tl = bridge.tl_parameters()
    c_attn = hf.transformer.h[1].attn.c_attn.weight
    assert tl["blocks.1.attn.W_K"].untyped_storage().data_ptr() == c_attn.untyped_storage().data_ptr()
    (grad,) = torch.autograd.grad(tl["blocks.1.attn.W_K"][2, 5, 3], c_attn)
    d, d_head = hf.config.n_embd, hf.config.n_embd // hf.config.n_head
    assert grad[5, d + 2 * d_head + 3] == 1 and grad.abs().sum() == 1


def test_stacked_weights_equal_hooked_transformer(transformer_lens):
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    model = hooked_transformer(hf, transformer_lens)
    for name in ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_out", "b_in", "b_out", "W_E", "W_U", "W_pos"]:
        assert torch.equal(getattr(bridge, name), getattr(model, name)), name


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("overrides", [{}, {"scale_attn_by_inverse_layer_idx": True}])
def test_every_cached_activation_equals_hooked_transformer(transformer_lens, padding, overrides):
    hf = make_gpt2(**overrides)
    bridge = fb.Bridge.from_hf(hf)
    model = hooked_transformer(hf, transformer_lens)
    tokens = random_tokens(3, 12, hf.config.vocab_size)
    mask = padding_mask([12, 9, 7], padding) if padding else None
    _, cache, _ = assert_caches_equal(bridge, model, tokens, mask)
    assert list(cache) == fb.hook_names(bridge.cfg)


def test_run_with_hooks_edits_like_hooked_transformer(transformer_lens):
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    model = hooked_transformer(hf, transformer_lens)
    tokens = random_tokens(2, 10, hf.config.vocab_size)

    def ablate_head(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def double_scale(scale, hook):
        return scale * 2

    hooks = [("blocks.1.attn.hook_z", ablate_head), ("blocks.0.ln2.hook_scale", double_scale)]
    with torch.no_grad():
        ours = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        theirs = model.run_with_hooks(tokens, fwd_hooks=hooks)
        theirs64 = hooked_float64(model).run_with_hooks(tokens, fwd_hooks=hooks)
        plain = bridge(tokens)
    assert_as_accurate_as(ours, theirs, theirs64)
    assert max_diff(ours, plain) > 1e-3


def test_tl_view_is_never_stale_after_training(transformer_lens):
    """After AdamW steps through bridge.parameters(), the TL view equals TransformerLens's
    conversion of the HF tensors the bridge shares, exactly."""
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    for step in range(3):
        tokens = random_tokens(2, 8, bridge.cfg.d_vocab, seed=step)
        optimizer.zero_grad()
        bridge(tokens).logsumexp(-1).mean().backward()
        optimizer.step()
    assert max_diff(hf.transformer.wte.weight, make_gpt2().transformer.wte.weight) > 1e-3
    assert_tl_weights_equal_conversion(bridge, hf, transformer_lens)
