"""TL-space edits written back to the HF leaves: fb.set_tl_weights and Bridge.set_tl_weights.

Oracles: the family's own TL view of the leaves it started from (round trips are bitwise), the
HF forward over the edited tensors, run_with_hooks ablations, and closed forms (an SGD step from
zero, a bias shifting logits)."""

import einops
import pytest
import torch
import torch.nn.functional as F

import functional_bridge as fb
from family_helpers import assert_equal_or_rounded, rounded_leaves
from functional_bridge.architectures import family_for
from functional_bridge.tl_layout import tl_layout
from helpers import make_gpt2, max_diff, random_tokens
from tolerance import assert_as_accurate_as, assert_rounding_close, float64, float64_copy
from tiny_models import architectures, causal_lm_architectures, tiny_model


def gpt2_bridge(**overrides):
    return fb.Bridge.from_hf(make_gpt2(**overrides))


def snapshot(params):
    return {name: value.detach().clone() for name, value in params.items()}


def assert_same_values(params, before):
    assert list(params) == list(before)
    for name, value in before.items():
        assert torch.equal(params[name], value), name


# round trips, every registered family -------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_tl_round_trip_is_exact(arch, tie):
    """hf_from_tl(tl_weights(p)) == p and tl_weights(hf_from_tl(tl)) == tl, bitwise, with and
    without the extra leaves processing adds; through a family's rounded TL keys (Gemma's scaled
    embedding and w + 1 norms), within the rounding of that arithmetic."""
    bridge = fb.Bridge.from_hf(tiny_model(arch, tie_word_embeddings=tie))
    family, cfg = family_for(bridge.cfg), bridge.cfg
    processed = fb.process_weights(bridge.params, cfg)
    for params in (bridge.params, processed):
        extras = [name for name in params if name in family.extra_param_shapes(cfg)]
        tl = fb.tl_weights(params, cfg)
        hf = family.hf_from_tl(tl, cfg, extras)
        assert_equal_or_rounded(hf, dict(params), rounded_leaves(cfg, extras))
        assert_equal_or_rounded(fb.tl_weights(hf, cfg), tl, family.tl_rounded_keys(cfg))


@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_what_is_written_is_read_back_and_nothing_else_moves(arch):
    """Keys derived from a written key (GPT-J's ln2 is its ln1) move with it; nothing else does.
    A rounded TL key (Gemma's) reads back within the rounding of its arithmetic."""
    bridge = fb.Bridge.from_hf(tiny_model(arch, tie_word_embeddings=False))
    cfg = bridge.cfg
    derived = family_for(cfg).tl_derived_keys(cfg)
    before = {key: value.detach().clone() for key, value in bridge.tl_parameters().items()}
    keys = ["blocks.0.attn.W_Q", "blocks.0.attn.W_O", "blocks.1.mlp.W_in", "blocks.1.ln1.w", "embed.W_E", "unembed.W_U"]
    keys = [key for key in keys if key in tl_layout(cfg, ()).backed]  # OLMo's weightless ln1 has nothing to write
    gen = torch.Generator().manual_seed(1)
    updates = {key: torch.randn(before[key].shape, generator=gen) for key in keys}
    edited = fb.tl_weights(fb.set_tl_weights(bridge.params, cfg, updates), cfg)
    keep = [key for key in before if derived.get(key) not in updates]
    expected = {key: updates.get(key, before[key]) for key in keep}
    assert_equal_or_rounded({key: edited[key] for key in keep}, expected, family_for(cfg).tl_rounded_keys(cfg))


# the pure function ----------------------------------------------------------------------------


def test_set_tl_weights_is_pure_and_replaces_only_the_touched_leaves():
    bridge = gpt2_bridge()
    params, cfg = bridge.params, bridge.cfg
    before = snapshot(params)
    W_O = torch.randn(cfg.n_heads, cfg.d_head, cfg.d_model)
    new = fb.set_tl_weights(params, cfg, {"blocks.1.attn.W_O": W_O})
    assert_same_values(params, before)
    assert list(new) == list(params)
    c_proj = "transformer.h.1.attn.c_proj.weight"
    assert torch.equal(new[c_proj], W_O.reshape(cfg.n_heads * cfg.d_head, cfg.d_model))  # HF's Conv1D rows
    assert new[c_proj].untyped_storage().data_ptr() != params[c_proj].untyped_storage().data_ptr()
    assert all(new[name] is params[name] for name in params if name != c_proj)


def test_values_are_cast_to_the_leaves_dtype_and_device():
    bridge = gpt2_bridge()
    value = torch.randn(bridge.cfg.d_model, dtype=torch.float64)
    new = fb.set_tl_weights(bridge.params, bridge.cfg, {"blocks.0.ln2.w": value})
    assert new["transformer.h.0.ln_2.weight"].dtype == torch.float32
    assert torch.equal(new["transformer.h.0.ln_2.weight"], value.float())


def test_set_tl_weights_is_differentiable():
    """d loss / d W_O through the edit equals autograd's gradient for the c_proj leaf, per head."""
    bridge = gpt2_bridge()
    params, cfg = bridge.params, bridge.cfg
    tokens = random_tokens(2, 8, cfg.d_vocab)
    W_O = bridge.tl_parameters()["blocks.1.attn.W_O"].detach()

    def loss(value):
        return fb.forward(fb.set_tl_weights(params, cfg, {"blocks.1.attn.W_O": value}), tokens, cfg).logsumexp(-1).mean()

    grad = torch.func.grad(loss)(W_O)

    def autograd(params):
        leaf = params["transformer.h.1.attn.c_proj.weight"]
        (expected,) = torch.autograd.grad(fb.forward(params, tokens, cfg).logsumexp(-1).mean(), leaf)
        return einops.rearrange(expected, "(i h) m -> i h m", i=cfg.n_heads)

    params64 = {name: value.requires_grad_() for name, value in float64(params).items()}
    assert_as_accurate_as(grad, autograd(params), autograd(params64))


# what each kind of key does -------------------------------------------------------------------


def test_errors_name_the_key():
    bridge = gpt2_bridge()
    params, cfg = bridge.params, bridge.cfg
    with pytest.raises(KeyError, match=r"blocks\.0\.attn\.W_Qx.*did you mean blocks\.0\.attn\.W_Q"):
        fb.set_tl_weights(params, cfg, {"blocks.0.attn.W_Qx": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.W_O has shape \(4, 12, 48\).*\(12, 4, 48\)"):
        fb.set_tl_weights(params, cfg, {"blocks.0.attn.W_O": torch.zeros(12, 4, 48)})
    with pytest.raises(TypeError, match=r"blocks\.0\.ln1\.w: expected a tensor"):
        fb.set_tl_weights(params, cfg, {"blocks.0.ln1.w": [1.0] * 48})


@pytest.mark.parametrize("arch", architectures())
def test_writing_a_derived_key_names_its_source(arch):
    """Every derived key other than a tied W_U (grouped-query W_K repeats _W_K) refuses, naming
    the key the family declares as its source; b_K and b_V too where HF has no k/v bias (they
    were once accepted, adding a zero k_proj.bias leaf and dropping the value)."""
    bridge = fb.Bridge.from_hf(tiny_model(arch))
    cfg = bridge.cfg
    derived = {d: s for d, s in family_for(cfg).tl_derived_keys(cfg).items() if d != "unembed.W_U"}
    if not derived:
        pytest.skip(f"{arch} (this config) has no derived TL keys besides a tied W_U")
    tl = bridge.tl_parameters()
    for key, source in derived.items():
        with pytest.raises(ValueError, match=f"{key} is derived from {source}.*edit {source}"):
            fb.set_tl_weights(bridge.params, cfg, {key: torch.ones(tl[key].shape)})


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_a_tl_weight_no_leaf_can_hold_is_refused(arch):
    """TL's gated MLP has a b_in that Llama-style HF layouts have no slot (and no extra) for."""
    if arch not in architectures():
        pytest.skip(f"{arch} is not registered yet")
    bridge = fb.Bridge.from_hf(tiny_model(arch))
    with pytest.raises(ValueError, match=r"no leaf of .* holds blocks\.0\.mlp\.b_in"):
        fb.set_tl_weights(bridge.params, bridge.cfg, {"blocks.0.mlp.b_in": torch.ones(bridge.cfg.d_mlp)})


def test_writing_a_tied_unembedding_unties_it_into_lm_head_weight():
    bridge = gpt2_bridge()
    params, cfg = bridge.params, bridge.cfg
    W_U = torch.randn(cfg.d_model, cfg.d_vocab)
    new = fb.set_tl_weights(params, cfg, {"unembed.W_U": W_U})
    assert list(new) == [*params, "lm_head.weight"]
    assert new["transformer.wte.weight"] is params["transformer.wte.weight"]
    hf = fb.Bridge(new, cfg, bridge.hf_config).to_hf()  # HF's own untied model over these tensors
    assert hf.config.tie_word_embeddings is False
    assert torch.equal(hf.lm_head.weight, W_U.T) and torch.equal(hf.transformer.wte.weight, params["transformer.wte.weight"])
    tokens = random_tokens(2, 8, cfg.d_vocab)
    with torch.no_grad():
        assert_as_accurate_as(fb.forward(new, tokens, cfg), hf(tokens).logits, float64_copy(hf)(tokens).logits)


def test_writing_a_tied_embedding_moves_the_unembedding_with_it():
    bridge = gpt2_bridge()
    W_E = torch.randn(bridge.cfg.d_vocab, bridge.cfg.d_model)
    new = fb.set_tl_weights(bridge.params, bridge.cfg, {"embed.W_E": W_E})
    assert list(new) == list(bridge.params)
    assert torch.equal(fb.tl_weights(new, bridge.cfg)["unembed.W_U"], W_E.T)


def test_writing_an_unembedding_bias_adds_the_declared_extra_leaf():
    bridge = gpt2_bridge()
    b_U = torch.randn(bridge.cfg.d_vocab)
    new = fb.set_tl_weights(bridge.params, bridge.cfg, {"unembed.b_U": b_U})
    assert list(new) == [*bridge.params, "unembed.b_U"]
    tokens = random_tokens(2, 8, bridge.cfg.d_vocab)
    with torch.no_grad():
        logits = fb.forward(new, tokens, bridge.cfg)
        shift = logits - bridge(tokens)
    # the same arithmetic but the unembedding's d_model-long sum, which may take the bias in first
    assert_rounding_close(shift, b_U.expand_as(shift), scale=logits.abs().max().item(), n=bridge.cfg.d_model)
    with pytest.raises(ValueError, match="no slot for unembed.b_U"):
        fb.Bridge(new, bridge.cfg, bridge.hf_config).to_hf()


@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (2, 3)])
def test_zeroing_a_head_via_W_O_equals_zero_ablating_its_hook_z(layer, head):
    bridge = gpt2_bridge()
    tokens = random_tokens(3, 10, bridge.cfg.d_vocab)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with torch.no_grad():
        expected = bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
        hooks = [(f"blocks.{layer}.attn.hook_z", ablate)]
        expected64 = fb.run_with_hooks(float64(bridge.params), tokens, bridge.cfg, fwd_hooks=hooks)
        W_O = bridge.tl_parameters()[f"blocks.{layer}.attn.W_O"].clone()
        W_O[head] = 0
        pure = fb.forward(fb.set_tl_weights(bridge.params, bridge.cfg, {f"blocks.{layer}.attn.W_O": W_O}), tokens, bridge.cfg)
        bridge.set_tl_weights({f"blocks.{layer}.attn.W_O": W_O})
        in_place = bridge(tokens)
        plain = fb.Bridge.from_hf(make_gpt2())(tokens)
    assert_as_accurate_as(pure, expected, expected64, what="pure")
    assert_as_accurate_as(in_place, expected, expected64, what="in place")
    assert max_diff(expected, plain) > 1e-3


# the Bridge method ----------------------------------------------------------------------------


def test_bridge_edit_is_in_place_seen_by_hf_and_never_stale_after_a_step():
    """The leaves stay the same objects (an optimizer built before sees them); the HF model that
    shares them computes the same logits after the edit and after an SGD step, and the zeroed
    head's W_O after one step from zero is -lr * its gradient."""
    hf = make_gpt2(attn="eager")
    bridge = fb.Bridge.from_hf(hf)
    leaves = dict(bridge.named_parameters())
    optimizer = torch.optim.SGD(bridge.parameters(), lr=0.1)
    W_O = bridge.tl_parameters()["blocks.1.attn.W_O"].detach().clone()
    W_O[2] = 0
    bridge.set_tl_weights({"blocks.1.attn.W_O": W_O})
    assert all(leaves[name] is value for name, value in bridge.named_parameters())
    tokens = random_tokens(2, 8, bridge.cfg.d_vocab)
    with torch.no_grad():
        assert_as_accurate_as(bridge(tokens), hf(tokens).logits, float64_copy(hf)(tokens).logits, what="edited")
    assert torch.equal(bridge.W_O[1, 2], torch.zeros_like(bridge.W_O[1, 2]))
    optimizer.zero_grad()
    F.cross_entropy(bridge(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grad = einops.rearrange(leaves["transformer.h.1.attn.c_proj.weight"].grad, "(i h) m -> i h m", i=bridge.cfg.n_heads)
    optimizer.step()
    assert torch.equal(bridge.W_O[1, 2], -0.1 * grad[2])
    with torch.no_grad():
        assert_as_accurate_as(bridge(tokens), hf(tokens).logits, float64_copy(hf)(tokens).logits, what="stepped")


def test_bridge_edit_is_atomic():
    bridge = gpt2_bridge()
    before = snapshot(bridge.state_dict())
    good = {"blocks.0.attn.W_O": torch.zeros(4, 12, 48), "unembed.W_U": torch.zeros(48, 97), "unembed.b_U": torch.ones(97)}
    bad_cases = [
        {**good, "blocks.0.attn.W_Qx": torch.zeros(1)},
        {**good, "blocks.2.mlp.W_in": torch.zeros(3)},
        {**good, "blocks.2.mlp.b_in": "not a tensor"},
    ]
    for updates in bad_cases:
        with pytest.raises((KeyError, ValueError, TypeError)):
            bridge.set_tl_weights(updates)
        assert_same_values(bridge.state_dict(), before)
        assert list(bridge.params) == [name for name in before if name != "lm_head.weight"]  # tied alias only


def test_bridge_edit_that_adds_extra_leaves_registers_them():
    bridge = gpt2_bridge()
    cfg = bridge.cfg
    W_U, b_U = torch.randn(cfg.d_model, cfg.d_vocab), torch.randn(cfg.d_vocab)
    bridge.set_tl_weights({"unembed.W_U": W_U, "unembed.b_U": b_U})
    params = dict(bridge.named_parameters())
    assert list(params)[-2:] == ["unembed.b_U", "lm_head.weight"]
    assert all(param.requires_grad for param in params.values())
    assert torch.equal(bridge.W_U, W_U) and torch.equal(bridge.b_U, b_U)
    tokens = random_tokens(2, 8, cfg.d_vocab)
    with torch.no_grad():
        assert max_diff(torch.func.functional_call(bridge, bridge.params, (tokens,)), bridge(tokens)) == 0
    logits = fb.forward(bridge.params, tokens, cfg)
    _, cache = bridge.run_with_cache(tokens, names_filter="unembed.hook_in")
    head = lambda x: x @ W_U.to(x.dtype) + b_U.to(x.dtype)  # noqa: E731  # the head: ln_f output @ W_U + b_U
    assert_as_accurate_as(logits, head(cache["unembed.hook_in"]), head(cache["unembed.hook_in"].double()))


def test_bridge_edit_may_read_the_leaves_it_overwrites():
    """Swapping two layers' W_in: every value is copied before any leaf is written."""
    bridge = gpt2_bridge()
    tl = bridge.tl_parameters()
    W_in0, W_in1 = tl["blocks.0.mlp.W_in"].detach().clone(), tl["blocks.1.mlp.W_in"].detach().clone()
    bridge.set_tl_weights({"blocks.0.mlp.W_in": tl["blocks.1.mlp.W_in"], "blocks.1.mlp.W_in": tl["blocks.0.mlp.W_in"]})
    assert torch.equal(bridge.W_in[0], W_in1) and torch.equal(bridge.W_in[1], W_in0)
