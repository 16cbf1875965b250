"""HookedSAETransformer's API on the Bridge against SAELens 6.54's HookedSAETransformer over the
same weights: logits and every cached value (the SAEs' hooks included), with and without the
error term, SAEs of every kind and transcoders, add_sae / reset_saes / saes(), hooks on SAE
features, exclude_special_tokens."""

import pytest
import torch

import functional_bridge.sae as fbsae
from helpers import random_tokens
from sae_oracle_helpers import SAES, assert_close_maps, hooked_sae_pair, make_sae
from tolerance import check, check_above, max_abs, max_diff, rounding_bound

pytestmark = pytest.mark.oracle


@pytest.fixture(scope="module")
def pair(sae_lens, transformer_lens):
    return hooked_sae_pair(sae_lens, transformer_lens)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(2, 9, 97, seed=3)


def run_both(pair, tokens, saes, **kwargs):
    bridge, model = pair
    with torch.no_grad():
        logits, cache = bridge.run_with_cache_with_saes(tokens, saes=saes, **kwargs)
        tl_logits, tl_cache = model.run_with_cache_with_saes(tokens, saes=[fbsae.to_sae_lens(s) for s in saes], **kwargs)
    return {**dict(cache.items()), "logits": logits}, {**dict(tl_cache.items()), "logits": tl_logits}


@pytest.mark.parametrize("use_error_term", [False, True])
@pytest.mark.parametrize("key", list(SAES))
def test_cache_with_one_sae_equals_hooked_sae_transformer(pair, tokens, key, use_error_term):
    sae = make_sae(key)
    ours, theirs = run_both(pair, tokens, [sae], use_error_term=use_error_term)
    output = sae.cfg.output_hook
    assert f"{output}.hook_sae_acts_post" in ours and (f"{output}.hook_sae_error" in ours) == use_error_term
    assert output not in ours  # the spliced hook is replaced by the SAE's hooks, as SAELens
    acts = ours[f"{output}.hook_sae_acts_post"]
    assert (acts > 0).any() and (acts == 0).any(), "degenerate SAE: all features on or off"
    assert_close_maps(ours, theirs, pair[0].cfg, tokens.shape[-1], 4 * sae.cfg.d_sae)


def test_all_saes_at_once_with_error_term_reproduce_the_logits(pair, tokens):
    bridge, _ = pair
    saes = [make_sae(key, seed=i) for i, key in enumerate(SAES)]
    ours, theirs = run_both(pair, tokens, saes, use_error_term=True)
    assert_close_maps(ours, theirs, bridge.cfg, tokens.shape[-1], 4 * 4 * 48)
    with torch.no_grad():
        plain = bridge(tokens)
        without = bridge.run_with_saes(tokens, saes=saes)
    bound = rounding_bound(max_abs(plain), torch.float64, 4 * 4 * 48 * len(saes))
    check(max_diff(ours["logits"], plain), bound, "error term reproduces the logits")
    check_above(max_diff(without, plain), 1e3 * bound, "without the error term the SAEs change the logits")


def test_feature_ablation_hook_shows_through_the_error_term(pair, tokens):
    """SAELens's error term is computed without the SAE's hooks: ablating a feature at
    hook_sae_acts_post changes the output by exactly that feature's decoder contribution."""
    bridge, model = pair
    sae = make_sae("standard@resid_pre")
    name = "blocks.1.hook_resid_pre.hook_sae_acts_post"

    def ablate(acts, hook):
        acts = acts.clone()
        acts[..., :16] = 0
        return acts

    with torch.no_grad():
        ours = bridge.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(name, ablate)])
        model.add_sae(fbsae.to_sae_lens(sae), use_error_term=True)
        bridge.add_sae(sae, use_error_term=True)
        ours_err = bridge.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
        theirs_err = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
        model.reset_saes()
        bridge.reset_saes()
        theirs = model.run_with_hooks_with_saes(tokens, saes=[fbsae.to_sae_lens(sae)], fwd_hooks=[(name, ablate)])
        plain = bridge(tokens)
    bound = rounding_bound(max_abs(theirs), torch.float64, 2000)
    check(max_diff(ours, theirs), bound, "ablation without error term")
    check(max_diff(ours_err, theirs_err), bound, "ablation with error term")
    check_above(max_diff(ours_err, plain), 1e3 * bound, "the ablation changes the output")


def test_add_sae_reset_and_context_restore(pair, tokens):
    bridge, _ = pair
    first, second = make_sae("standard@resid_pre", seed=1), make_sae("standard@resid_pre", seed=2)
    with torch.no_grad():
        plain = bridge(tokens)
        bridge.add_sae(first)
        with_first = bridge(tokens)
        assert list(bridge.acts_to_saes) == ["blocks.1.hook_resid_pre"]
        with bridge.saes([second]):
            assert bridge.acts_to_saes["blocks.1.hook_resid_pre"] is second
            with_second = bridge(tokens)
        assert bridge.acts_to_saes["blocks.1.hook_resid_pre"] is first
        assert torch.equal(bridge(tokens), with_first)
        bridge.reset_saes()
        assert bridge.acts_to_saes == {} and torch.equal(bridge(tokens), plain)
    assert max_diff(with_first, with_second) > 0
    _, cache = bridge.run_with_cache(tokens)
    assert "blocks.1.mlp.hook_in" not in cache and "blocks.1.hook_resid_pre" in cache  # HookedTransformer's names again


def test_sae_lens_objects_are_accepted(pair, tokens):
    bridge, model = pair
    lens = fbsae.to_sae_lens(make_sae("gated@resid_post"))
    with torch.no_grad():
        ours = bridge.run_with_saes(tokens, saes=[lens])
        theirs = model.run_with_saes(tokens, saes=[lens])
    check(max_diff(ours, theirs), rounding_bound(max_abs(theirs), torch.float64, 3000), "sae_lens SAE on the bridge")


def test_exclude_special_tokens_list(pair, tokens):
    bridge, model = pair
    sae = make_sae("standard@resid_pre")
    special = [int(tokens[0, 0]), int(tokens[1, 4])]
    ours, theirs = run_both(pair, tokens, [sae], use_error_term=True, exclude_special_tokens=special)
    assert_close_maps(ours, theirs, bridge.cfg, tokens.shape[-1], 4 * sae.cfg.d_sae)
    out, original = ours["blocks.1.hook_resid_pre.hook_sae_output"], ours["blocks.1.hook_resid_pre.hook_sae_input"]
    assert torch.equal(out[0, 0], original[0, 0]) and torch.equal(out[1, 4], original[1, 4])  # bypassed


def test_skip_transcoder_includes_its_skip_path(pair, tokens):
    """SAELens's splice drops W_skip (it calls encode/decode); ours adds it, so the spliced output
    is SAELens's SkipTranscoder.forward of the input hook's activation."""
    bridge, model = pair
    cfg = fbsae.SAEConfig("skip_transcoder", d_in=48, d_sae=96, d_out=48, apply_b_dec_to_input=False, dtype="float64",
                          hook_name="blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out")  # fmt: skip
    sae = fbsae.SAE.random(cfg, scale=3.0)
    lens = fbsae.to_sae_lens(sae)
    with torch.no_grad():
        _, cache = bridge.run_with_cache_with_saes(tokens, saes=[sae])
        _, tl_cache = model.run_with_cache_with_saes(tokens, saes=[lens])
        expected = lens.forward(tl_cache["blocks.1.mlp.hook_in"])
        zero_skip = fbsae.SAE({**sae.params, "W_skip": torch.zeros_like(sae.params["W_skip"])}, cfg)
        ours0, theirs0 = run_both(pair, tokens, [zero_skip])
    out = cache["blocks.1.hook_mlp_out.hook_sae_output"]
    check(max_diff(out, expected), rounding_bound(max_abs(expected), torch.float64, 3000), "skip transcoder output")
    assert_close_maps(ours0, theirs0, bridge.cfg, tokens.shape[-1], 400)


def test_unknown_hooks_are_refused(pair):
    bridge, _ = pair
    with pytest.raises(KeyError, match="not a hook point"):
        bridge.add_sae(make_sae("standard@resid_pre", hook_name="blocks.1.hook_resid_prex"))
    assert bridge.acts_to_saes == {}
    with pytest.raises(KeyError, match="has an SAE spliced in"):
        bridge.run_with_hooks_with_saes(torch.zeros(1, 3, dtype=torch.long), saes=[make_sae("standard@resid_pre")],
                                        fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: None)])  # fmt: skip
    assert bridge.acts_to_saes == {}


def test_transcoder_is_keyed_by_its_input_hook(pair):
    bridge, model = pair
    transcoder = make_sae("transcoder@mlp.hook_in")
    bridge.add_sae(transcoder)
    model.add_sae(fbsae.to_sae_lens(transcoder))
    try:
        assert list(bridge.acts_to_saes) == list(model.acts_to_saes) == ["blocks.1.mlp.hook_in"]
    finally:
        bridge.reset_saes()
        model.reset_saes()
    assert bridge.acts_to_saes == {} == model.acts_to_saes


def test_exclude_special_tokens_from_the_tokenizer(pair, tokens):
    """True takes the tokenizer's BOS/EOS/PAD/SEP ids (SAELens's get_special_token_ids): the same
    run as passing those ids as a list, which test_exclude_special_tokens_list checks against
    SAELens."""
    from tokenizers_local import gpt2_tokenizer

    bridge, _ = pair
    tokenizer = gpt2_tokenizer()
    special = sorted({getattr(tokenizer, a) for a in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id")} - {None})
    assert special and max(special) < 97
    tokens = tokens.clone()
    tokens[:, 0] = special[0]
    sae = make_sae("standard@resid_pre")
    previous = bridge.tokenizer
    bridge.set_tokenizer(tokenizer)
    try:
        with torch.no_grad():
            by_tokenizer = bridge.run_with_saes(tokens, saes=[sae], exclude_special_tokens=True)
    finally:
        bridge.tokenizer = previous
    with torch.no_grad():
        by_list = bridge.run_with_saes(tokens, saes=[sae], exclude_special_tokens=special)
        plain = bridge.run_with_saes(tokens, saes=[sae])
    assert torch.equal(by_tokenizer, by_list) and not torch.equal(by_list, plain)


def test_llama_gqa_hook_z_sae_and_mlp_hook_in_transcoder(sae_lens, transformer_lens):
    """A gated-MLP, grouped-query family (float64): HookedSAETransformer over the same weights
    (its HookedTransformer's state loaded into one), every cached value, error term on."""
    import functional_bridge as fb
    from family_helpers import make_family
    from test_tl_oracle_families import hooked_transformer

    hf = make_family("llama", "base").double()  # 6 query heads over 2 key/value heads
    bridge = fb.Bridge.from_hf(hf)
    plain = hooked_transformer(hf, transformer_lens)
    model = sae_lens.HookedSAETransformer(plain.cfg)
    model.load_state_dict(plain.state_dict())
    model = model.double().eval()
    c = bridge.cfg
    sae = fbsae.SAE.random(fbsae.SAEConfig("standard", d_in=c.n_heads * c.d_head, d_sae=64, dtype="float64",
                                           hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z"), scale=3.0)  # fmt: skip
    transcoder = fbsae.SAE.random(fbsae.SAEConfig("jumprelu_transcoder", d_in=c.d_model, d_sae=64, d_out=c.d_model,
                                                  apply_b_dec_to_input=False, dtype="float64", hook_name="blocks.0.mlp.hook_in",
                                                  hook_name_out="blocks.0.hook_mlp_out"), scale=3.0)  # fmt: skip
    tokens = random_tokens(2, 8, c.d_vocab, seed=1)
    ours, theirs = run_both((bridge, model), tokens, [sae, transcoder], use_error_term=True)
    assert "blocks.0.mlp.hook_in" in ours and "blocks.1.attn.hook_z.hook_sae_recons" in ours
    assert_close_maps(ours, theirs, c, tokens.shape[-1], 600)
