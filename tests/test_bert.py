"""BERT (BertForMaskedLM, BertForPreTraining) against HF's own models: MLM logits with padding and
token types on both of HF's attention paths, a float64 reference, bfloat16, the HF leaves, to_hf,
from_config, TL edits through the inverse, and the refusals (options, inputs, causal-LM-only API).

Bounds: fp32 logits within 1e-4 of the logit scale of HF's eager and sdpa logits, and no further
from HF's float64 logits than 2x the further of HF's own two float32 paths (the issue's bound,
and HF's own rounding as the yardstick: tests/tolerance.py); bfloat16 no further from float32
than the better of HF's bfloat16 paths, up to one bfloat16 rounding of the output."""

import pytest
import torch
import transformers

import functional_bridge as fb
from bert_helpers import ARCHITECTURES, VOCAB, bert_batch, bert_config, float64_reference, hf_logits, make_bert
from functional_bridge.architectures import family_for
from helpers import make_gpt2, max_diff, random_tokens
from tolerance import as_accurate_as_bound, assert_rounding_close, check, check_above, eps, forward_depth

FORCE_EXPLICIT = [(lambda name: name.endswith("hook_pattern"), lambda x, hook: None)]


def _params_cfg(hf):
    return {k: v.detach() for k, v in hf.named_parameters()}, fb.Bridge.from_hf(hf).cfg


def _hf_paths(hf, tokens, **inputs) -> dict:
    out = {}
    for attn in ("eager", "sdpa"):
        hf.set_attn_implementation(attn)
        out[attn] = hf_logits(hf, tokens, **inputs)
    return out


def assert_fp32_parity(ours, hf_paths: dict, reference):
    scale = reference.abs().max().item()
    for attn, logits in hf_paths.items():
        check(max_diff(ours, logits), 1e-4 * scale, f"vs HF {attn}, relative to the logit scale")
    further = max(hf_paths.values(), key=lambda logits: max_diff(logits, reference))
    check(max_diff(ours, reference), as_accurate_as_bound(further, reference, factor=2.0), "vs float64, 2x HF's further path")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_params_are_the_hf_leaves_in_hf_order(architecture):
    hf = make_bert(architecture)
    bridge = fb.Bridge.from_hf(hf)
    hf_named = list(hf.named_parameters())
    assert [(n, tuple(p.shape)) for n, p in hf_named] == list(family_for(bridge.cfg).param_shapes(bridge.cfg).items())
    assert all(a is b for a, (_, b) in zip(bridge.parameters(), hf_named))
    assert len(list(bridge.buffers())) == 0
    assert bridge.cfg.original_architecture == architecture and bridge.cfg.n_token_types == 3


@pytest.mark.parametrize("path", ["sdpa", "explicit"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_equal_hf_with_padding_and_token_types(architecture, side, path):
    hf = make_bert(architecture)
    tokens, mask, types = bert_batch([13, 9, 4, 11], side)
    inputs = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        reference = float64_reference(hf, tokens, **inputs)
        expected = _hf_paths(hf, tokens, **inputs)
        ours = fb.Bridge.from_hf(hf)(tokens, hooks=FORCE_EXPLICIT if path == "explicit" else None, **inputs)
    assert ours.shape == (4, 13, VOCAB) and not ours.isnan().any()
    assert_fp32_parity(ours, expected, reference)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_equal_hf_without_mask_or_token_types(architecture):
    """Defaults as HF's: every key attended, token type 0; a 1-D input is one row."""
    hf = make_bert(architecture)
    tokens = random_tokens(2, 17, VOCAB)
    with torch.no_grad():
        reference = float64_reference(hf, tokens)
        bridge = fb.Bridge.from_hf(hf)
        assert_fp32_parity(bridge(tokens), _hf_paths(hf, tokens), reference)
        assert_fp32_parity(bridge(tokens[0])[0], {"eager": hf_logits(hf, tokens[:1])[0]}, reference[0])


def test_positions_count_padding_as_hf_does():
    """An encoder's positions are absolute, padding included (HF's rule, not the causal
    families'): a right-padded row equals the row alone; a left-padded row does not, in HF
    and here alike (each matched to HF's padded run by the test above)."""
    hf = make_bert()
    bridge = fb.Bridge.from_hf(hf)
    scale_bound = 1e-4
    for side in ("right", "left"):
        tokens, mask, types = bert_batch([13, 6], side)
        with torch.no_grad():
            padded = bridge(tokens, attention_mask=mask, token_type_ids=types)
            real = mask[1].bool()
            alone = hf_logits(hf, tokens[1][real][None], token_type_ids=types[1][real][None])[0]
        gap, scale = max_diff(padded[1][real], alone), alone.abs().max().item()
        if side == "right":
            check(gap, scale_bound * scale, "right-padded row vs the row alone")
        else:
            check_above(gap, 100 * scale_bound * scale, "left-padded row vs the row alone")


def _bf16_errors(seed):
    """Max abs logit error against HF's float32 logits of ours and HF's (sdpa, eager) in
    bfloat16, and one bfloat16 rounding at the logits' magnitude ("ulp")."""
    hf = make_bert(seed=seed, qk_scale=1.0)
    tokens, mask, types = bert_batch([16, 11, 5], "right", seed=seed)
    inputs = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        reference = hf_logits(hf, tokens, **inputs).double()
        hf.to(torch.bfloat16)
        ours = fb.Bridge.from_hf(hf)(tokens, **inputs)
        errors = {"ours": max_diff(ours, reference), "ulp": eps(torch.bfloat16) * reference.abs().max().item()}
        for attn, logits in _hf_paths(hf, tokens, **inputs).items():
            errors[f"hf_{attn}"] = max_diff(logits, reference)
    assert ours.dtype == torch.bfloat16
    return errors


def test_bfloat16_is_as_close_to_float32_as_hf():
    """No further from float32 than the better of HF's bfloat16 paths (sdpa, its default, and
    eager), up to one bfloat16 rounding of the output, as for the causal families
    (tests/test_forward_parity.py)."""
    for seed in range(3):
        e = _bf16_errors(seed)
        check(e["ours"] - min(e["hf_sdpa"], e["hf_eager"]), e["ulp"], f"seed {seed}: error over HF's")


WRONG_SETTINGS = [dict(eps=1e-2), dict(act_fn="gelu_new"), dict(attn_scale=4.0)]


@pytest.mark.parametrize("change", WRONG_SETTINGS, ids=str)
def test_a_wrong_setting_fails_parity_by_a_wide_margin(change):
    """Each misses the parity bound at least 3x (GELU's tanh approximation, the closest, ~5x)."""
    hf = make_bert()
    params, cfg = _params_cfg(hf)
    tokens, mask, types = bert_batch([13, 9, 4], "right")
    inputs = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        expected = hf_logits(hf, tokens, **inputs)
        bound = 1e-4 * expected.abs().max()
        check(max_diff(fb.forward(params, tokens, cfg, **inputs), expected), bound, "right setting")
        check_above(max_diff(fb.forward(params, tokens, cfg.replace(**change), **inputs), expected), 3 * bound, str(change))


def test_token_types_and_padding_reach_the_logits():
    """Dropping the token types, or the mask, misses parity by a wide margin: the test model sees both."""
    hf = make_bert()
    params, cfg = _params_cfg(hf)
    tokens, mask, types = bert_batch([13, 9, 4], "right")
    with torch.no_grad():
        expected = hf_logits(hf, tokens, attention_mask=mask, token_type_ids=types)
        bound = 3e-4 * expected.abs().max()  # 3x the parity bound
        real = mask.bool()
        check_above(max_diff(fb.forward(params, tokens, cfg, attention_mask=mask)[real], expected[real]), bound, "no types")
        check_above(max_diff(fb.forward(params, tokens, cfg, token_type_ids=types)[real], expected[real]), bound, "no mask")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(is_decoder=True), "is_decoder"),
        (dict(is_decoder=True, add_cross_attention=True), "is_decoder"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings=False"),
        (dict(hidden_act="mystery"), "hidden_act 'mystery'"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_unsupported_options_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        fb.config_from_hf(bert_config(**overrides))
    with pytest.raises(ValueError, match=message):
        fb.Bridge.from_config(bert_config(**overrides))


def test_bad_token_types_are_refused_by_name():
    bridge = fb.Bridge.from_hf(make_bert())
    tokens, mask, types = bert_batch([6, 4], "right")
    with pytest.raises(ValueError, match=r"token_type_ids must be in \[0, 3\)"):
        bridge(tokens, token_type_ids=types + 1)
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        bridge(tokens, token_type_ids=types[:, :3])
    for wrong in (types.float(), types.bool()):
        with pytest.raises(TypeError, match="token_type_ids must be an integer tensor"):
            bridge(tokens, token_type_ids=wrong)
    with torch.no_grad():  # small integer types are ids, never a boolean mask
        assert torch.equal(bridge(tokens, token_type_ids=types.to(torch.uint8)), bridge(tokens, token_type_ids=types))
    gpt2 = fb.Bridge.from_hf(make_gpt2())
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no token-type embeddings"):
        gpt2(tokens, token_type_ids=types)


def test_causal_lm_only_api_is_refused_by_name():
    bridge = fb.Bridge.from_hf(make_bert())
    tokens = random_tokens(2, 6, VOCAB)
    with pytest.raises(ValueError, match=r"default loss \(next-token prediction\) is for causal LMs; BertForMaskedLM is a masked lm"):
        fb.per_example_grads(bridge.params, bridge.cfg, tokens)
    with pytest.raises(ValueError, match="weight processing is not defined for BertForMaskedLM: TransformerLens 3.9"):
        bridge.processed()
    with pytest.raises(ValueError, match="HookedEncoder"):
        fb.process_weights(bridge.params, bridge.cfg, fold_ln=False, center_writing_weights=False)
    _, cache = bridge.run_with_cache(tokens)
    post_ln = "LayerNorms rewrite the residual stream after every sublayer"
    for name, call in [
        ("decompose_resid", lambda: cache.decompose_resid()),
        ("get_full_resid_decomposition", lambda: cache.get_full_resid_decomposition()),
        ("apply_ln_to_stack", lambda: cache.accumulated_resid(apply_ln=True)),
        ("apply_ln_to_stack", lambda: cache.logit_attrs(cache.stack_head_results(), tokens)),
        ("incl_remainder", lambda: cache.stack_head_results(incl_remainder=True)),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"{name}.* is for causal LMs.*{post_ln}"):
            call()
    assert cache.stack_head_results().shape == (12, 2, 6, 48)  # per-head outputs need no sum


def test_unknown_hook_names_list_hooked_encoders():
    bridge = fb.Bridge.from_hf(make_bert())
    names = fb.hook_names(bridge.cfg)
    assert len(names) == 6 + 18 * bridge.cfg.n_layers + 4
    with pytest.raises(KeyError, match="blocks.1.hook_normalized_resid_post"):
        bridge.run_with_cache(random_tokens(1, 4, VOCAB), names_filter="blocks.1.hook_normalised_resid_post")
    with pytest.raises(KeyError, match="ln_final"):  # a causal LM's name, not HookedEncoder's
        bridge.run_with_hooks(random_tokens(1, 4, VOCAB), fwd_hooks=[("ln_final.hook_scale", lambda x, hook: x)])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_hf_from_tl_inverts_tl_weights(architecture):
    params, cfg = _params_cfg(make_bert(architecture))
    fam = family_for(cfg)
    back = fam.hf_from_tl(fam.tl_weights(params, cfg), cfg, ())
    assert list(back) == list(params)
    for name, value in params.items():
        assert torch.equal(back[name], value), name
        assert back[name].untyped_storage().data_ptr() != value.untyped_storage().data_ptr(), name
    tl = fam.tl_weights(params, cfg)
    again = fam.tl_weights(fam.hf_from_tl(tl, cfg, ()), cfg)
    assert list(again) == list(tl) and all(torch.equal(again[key], value) for key, value in tl.items())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_to_hf_from_config_and_from_pretrained(architecture, tmp_path):
    hf = make_bert(architecture)
    bridge = fb.Bridge.from_hf(hf)
    exported = bridge.to_hf()
    assert type(exported).__name__ == architecture
    assert all(a is b for a, b in zip(exported.parameters(), bridge.parameters()))
    assert exported.cls.predictions.decoder.weight is bridge.params["bert.embeddings.word_embeddings.weight"]
    tokens, mask, types = bert_batch([9, 5], "right")
    with torch.no_grad():
        assert torch.equal(hf_logits(exported, tokens, attention_mask=mask), hf_logits(hf, tokens, attention_mask=mask))
    other = fb.Bridge.from_hf(make_bert(architecture, seed=1))
    assert set(other.state_dict()) == set(hf.state_dict())  # HF's keys, tied decoder aliases included
    other.load_state_dict(hf.state_dict())
    assert all(torch.equal(other.params[name], p) for name, p in hf.named_parameters())
    config = bert_config(architectures=[architecture])
    fresh = fb.Bridge.from_config(config, seed=3)
    torch.manual_seed(3)
    expected = getattr(transformers, architecture)._from_config(config)
    assert fresh.cfg.original_architecture == architecture
    assert all(torch.equal(fresh.params[n], p) for n, p in expected.named_parameters())
    assert fb.Bridge.from_config(bert_config()).cfg.original_architecture == "BertForMaskedLM"
    hf.save_pretrained(tmp_path)
    loaded = fb.Bridge.from_pretrained(str(tmp_path))
    assert loaded.cfg == bridge.cfg and all(torch.equal(loaded.params[n], p) for n, p in hf.named_parameters())


def test_stacked_weights_use_hooked_encoders_names():
    bridge = fb.Bridge.from_hf(make_bert())
    tl = bridge.tl_parameters()
    assert bridge.W_E is tl["embed.embed.W_E"] and bridge.W_pos is tl["embed.pos_embed.W_pos"]
    assert torch.equal(bridge.W_U, tl["embed.embed.W_E"].T) and bridge.b_U is tl["unembed.b_U"]
    assert bridge.W_Q.shape == (3, 4, 48, 12) and torch.equal(bridge.W_in[1], tl["blocks.1.mlp.W_in"])
    assert bridge.QK.AB.shape == (3, 4, 48, 48)


def test_set_tl_weights_edits_the_hf_leaves():
    """An edit in TL's names equals the same edit made by hand on HF's model; the tied W_U is
    refused with its source named; writing W_E moves the tied decoder with it."""
    hf = make_bert()
    bridge = fb.Bridge.from_hf(make_bert())
    W_O = bridge.W_O[1].detach().clone()
    W_O[2] = 0
    W_E = bridge.W_E.detach() * 1.5
    bridge.set_tl_weights({"blocks.1.attn.W_O": W_O, "embed.embed.W_E": W_E})
    with torch.no_grad():
        hf.bert.encoder.layer[1].attention.output.dense.weight[:, 24:36] = 0  # head 2's d_head columns
        hf.bert.embeddings.word_embeddings.weight.mul_(1.5)
        tokens, mask, types = bert_batch([9, 5], "right")
        assert torch.equal(bridge.params["bert.encoder.layer.1.attention.output.dense.weight"],
                           hf.bert.encoder.layer[1].attention.output.dense.weight)  # fmt: skip
        expected = hf_logits(hf, tokens, attention_mask=mask, token_type_ids=types)
        ours = bridge(tokens, attention_mask=mask, token_type_ids=types)
        check(max_diff(ours, expected), 1e-4 * expected.abs().max().item(), "edited vs HF edited by hand")
    assert torch.equal(bridge.W_U, W_E.T)
    with pytest.raises(ValueError, match="unembed.W_U is derived from embed.embed.W_E"):
        bridge.set_tl_weights({"unembed.W_U": W_E.T.clone()})


def test_masked_lm_loss_equals_hfs():
    """On the same (float64) logits, HF's BertForMaskedLM loss for the same labels."""
    hf = make_bert().double()
    tokens, mask, types = bert_batch([13, 9, 4], "right")
    labels = torch.full_like(tokens, -100)
    labels[:, 1:4] = tokens[:, 1:4]
    labels[2, 3] = -100
    with torch.no_grad():
        out = hf(tokens, labels=labels, attention_mask=mask, token_type_ids=types)
    ours = fb.masked_lm_loss(out.logits, labels, mask)
    assert_rounding_close(ours, out.loss, n=VOCAB, what="MLM loss: a log-softmax over the vocabulary, a mean")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_stop_at_layer_is_hfs_hidden_state(architecture):
    """forward(stop_at_layer=n) on an encoder: the residual stream leaving block n - 1 (n = 0: the
    embedding LayerNorm's output), HF's hidden_states[n], with padding and token types; the same
    values as the full forward's hook there. HookedEncoder has no stop_at_layer: this is ours."""
    hf = make_bert(architecture).double()
    params, cfg = _params_cfg(hf)
    tokens, mask, types = bert_batch([7, 4, 6], "right")
    with torch.no_grad():
        hidden = hf.bert(tokens, attention_mask=mask, token_type_ids=types, output_hidden_states=True).hidden_states
        names = ["hook_full_embed"] + [f"blocks.{layer}.hook_normalized_resid_post" for layer in range(cfg.n_layers)]
        _, cache = fb.run_with_cache(params, tokens, cfg, attention_mask=mask, token_type_ids=types, names_filter=names)
        for n in range(cfg.n_layers + 1):
            resid = fb.forward(params, tokens, cfg, attention_mask=mask, token_type_ids=types, stop_at_layer=n)
            assert torch.equal(resid, cache[names[n]]), n
            assert_rounding_close(resid, hidden[n], n=forward_depth(cfg, 7), what=f"stop_at_layer={n}")
        assert torch.equal(fb.forward(params, tokens, cfg, attention_mask=mask, token_type_ids=types, stop_at_layer=-1),
                           cache[names[-2]])  # fmt: skip
    with pytest.raises(TypeError, match="stop_at_layer"):
        fb.forward(params, tokens, cfg, stop_at_layer=1.5)
    with pytest.raises(NotImplementedError, match="start_at_layer"):
        fb.forward(params, torch.zeros(2, 4, cfg.d_model, dtype=torch.float64), cfg, start_at_layer=1)


def test_sae_activations_stream_from_an_encoder():
    """The SAE activation stream on BERT (it runs only as far as the hook's block): each row's
    real tokens' activations, as the full run_with_cache gives them (without autograd, as the
    stream runs: on CPU, recording autograd takes the explicit attention path)."""
    from functional_bridge.sae.stream import activations, stream_activations

    bridge = fb.Bridge.from_hf(make_bert())
    tokens, mask, _ = bert_batch([7, 4, 6], "right")
    with torch.no_grad():
        for name in ("blocks.0.hook_resid_post", "blocks.1.attn.hook_z"):
            rows = activations(bridge.params, tokens, bridge._config, name, mask)
            expected = bridge.run_with_cache(tokens, attention_mask=mask, names_filter=name)[1][name][mask.bool()]
            assert torch.equal(rows, expected.flatten(1) if name.endswith("hook_z") else expected), name
        (streamed,) = stream_activations(bridge, [tokens], "blocks.0.hook_resid_post")
        expected = bridge.run_with_cache(tokens, names_filter="blocks.0.hook_resid_post")[1]["blocks.0.hook_resid_post"]
    assert torch.equal(streamed, expected.flatten(0, 1))
