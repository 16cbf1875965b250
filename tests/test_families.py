"""The families beyond GPT-2 (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX, GPT-J, Gemma 1/2/3, ...)
against their HF models (eager and sdpa; as accurate as HF against HF's own float64 run), rows run alone, Python loops, and the TL->HF inverse
against the leaves."""

import pytest
import torch
import transformers
from torch.func import grad, vmap

import functional_bridge as fb
from family_helpers import (
    ALL_VARIANTS, FAMILIES, VOCAB, family_config, make_family, rounded_leaves, supports,
)  # fmt: skip
from functional_bridge.architectures import family_for
from helpers import max_diff, padded_batch, random_tokens
from tolerance import (
    as_accurate_as_bound, assert_as_accurate_as, check, check_above, eps, float64, float64_copy, forward_depth,
    max_abs, rounding_bound,
)  # fmt: skip


def _as_accurate_or_rounding(ours, oracle, ref64, n: int, what: str, shared_scale: bool = False) -> None:
    """Ours as accurate as the oracle (assert_as_accurate_as's bound), or within float32 rounding
    over the n roundings of the computation's longest chain: an oracle run alone can round
    luckily (Gemma 3 on 2 threads: 10x closer to float64 than on 1), which no bound of ours should
    depend on. Each key's rounding is at its own magnitude (activations), or with shared_scale
    at the largest over all keys (gradients, as assert_as_accurate_as takes them: a key whose
    true value is 0, a key bias's gradient under softmax, holds the others' rounding noise)."""
    ours = ours if isinstance(ours, dict) else {"": ours}
    oracle = oracle if isinstance(oracle, dict) else {"": oracle}
    ref64 = ref64 if isinstance(ref64, dict) else {"": ref64}
    shared = max(max_abs(value) for value in ref64.values()) if shared_scale else None
    for key in ref64:
        scale = max_abs(ref64[key]) if shared is None else shared
        bound = max(as_accurate_as_bound(oracle[key], ref64[key], scale=scale), rounding_bound(scale, torch.float32, n))
        check(max_diff(ours[key], ref64[key]), bound, f"{what} {key}".strip())

FORCE_EXPLICIT = [(lambda name: name.endswith("hook_pattern"), lambda x, hook: None)]


def _params_cfg(hf):
    return {k: v.detach() for k, v in hf.named_parameters()}, fb.config_from_hf(hf.config)


@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_params_are_the_hf_leaves_in_hf_order(family, variant):
    hf = make_family(family, variant)
    bridge = fb.Bridge.from_hf(hf)
    hf_named = list(hf.named_parameters())
    assert [(n, tuple(p.shape)) for n, p in hf_named] == list(family_for(bridge.cfg).param_shapes(bridge.cfg).items())
    assert all(a is b for a, (_, b) in zip(bridge.parameters(), hf_named))
    assert len(list(bridge.buffers())) == 0  # no rotary tables or masks stored


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_logits_equal_hf(family, variant, attn):
    hf = make_family(family, variant, attn=attn)
    if not supports(hf, attn):
        pytest.skip(f"{type(hf).__name__} has no {attn} attention in transformers {transformers.__version__}")
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(3, 19, VOCAB)
    with torch.no_grad():
        expected, ref64 = hf(tokens).logits, float64_copy(hf)(tokens).logits
        assert_as_accurate_as(bridge(tokens), expected, ref64, what="default path")
        assert_as_accurate_as(bridge(tokens, hooks=FORCE_EXPLICIT), expected, ref64, what="explicit path")


@pytest.mark.parametrize("path", ["sdpa", "explicit"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_rows_equal_each_row_alone_through_hf(family, side, path):
    """Positions count real tokens, so each padded row's logits at its real positions equal
    HF's for that row run alone (sliding windows included: the rows are 11 > window long)."""
    hf = make_family(family)
    hf64 = float64_copy(hf)
    bridge = fb.Bridge.from_hf(hf)
    tokens, mask = padded_batch(VOCAB, [11, 6, 1, 8], side)
    with torch.no_grad():
        logits = bridge(tokens, attention_mask=mask, hooks=FORCE_EXPLICIT if path == "explicit" else None)
        assert not logits.isnan().any()
        for row in range(len(tokens)):
            alone = tokens[row][mask[row].bool()][None]
            _as_accurate_or_rounding(logits[row][mask[row].bool()], hf(alone).logits[0], hf64(alone).logits[0],
                                     forward_depth(bridge.cfg, 11), what=f"row {row}")


def _bf16_errors(family, seed):
    """Max abs logit error against HF float32 of ours and of HF in bfloat16 (each attention HF
    has), and one unit of bfloat16 rounding at the logits' magnitude ("ulp"). HF's float32 rotary
    buffers are kept, as HF's own from_pretrained(dtype=bfloat16) keeps them."""
    hf = make_family(family, seed=seed, qk_scale=1.0)
    tokens = random_tokens(2, 24, VOCAB, seed=seed)
    with torch.no_grad():
        reference = hf(tokens).logits.double()
        buffers = {name: buffer.clone() for name, buffer in hf.named_buffers()}
        hf.to(torch.bfloat16)
        for name, buffer in buffers.items():
            module, _, leaf = name.rpartition(".")
            hf.get_submodule(module)._buffers[leaf] = buffer
        ours = fb.Bridge.from_hf(hf)(tokens)
        errors = {"ours": max_diff(ours, reference), "ulp": eps(torch.bfloat16) * reference.abs().max().item()}
        for attn in ("sdpa", "eager"):
            if supports(hf, attn):
                hf.set_attn_implementation(attn)
                errors[f"hf_{attn}"] = max_diff(hf(tokens).logits, reference)
    assert ours.dtype == torch.bfloat16
    return errors


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_is_as_close_to_float32_as_hf(family):
    """As the GPT-2 test: no further from float32 than the better of HF's bfloat16 paths, up to
    one unit of bfloat16 rounding at the logits' magnitude (the output's own last rounding may go
    either way)."""
    for seed in range(2):
        e = _bf16_errors(family, seed)
        hf_best = min(e[f"hf_{attn}"] for attn in ("sdpa", "eager") if f"hf_{attn}" in e)
        check(e["ours"] - hf_best, e["ulp"], f"seed {seed}: error over HF's")


WRONG_SETTINGS = [
    ("llama", "base", dict(rotary_base=10000.0)),
    ("llama", "base", dict(rotary_adjacent_pairs=True)),
    ("llama", "base", dict(rotary_dim=8)),
    ("llama", "linear_rope", dict(rotary_scaling_factor=1.0)),
    ("llama", "llama3_rope", dict(use_NTK_by_parts_rope=False)),
    ("mistral", "base", dict(window_size=None)),
    ("qwen2", "base", dict(attn_types=None)),  # the window on every layer, not layers >= 1
    ("qwen3", "base", dict(eps=1e-1)),  # reaches q_norm and k_norm too
    ("qwen3", "base", dict(rotary_base=10000.0)),
    ("gpt_neox", "base", dict(rotary_dim=12)),
    ("gpt_neox", "base", dict(rotary_adjacent_pairs=True)),
    ("gpt_neox", "base", dict(rotary_base=10000.0)),
    ("gptj", "base", dict(rotary_adjacent_pairs=False)),
    ("gptj", "base", dict(rotary_dim=12)),
    ("gptj", "base", dict(rotary_base=1000.0)),
    ("gemma", "base", dict(rotary_base=10000.0)),
    ("gemma2", "base", dict(attn_scores_soft_cap=None)),
    ("gemma2", "base", dict(output_logits_soft_cap=None)),
    ("gemma2", "base", dict(attn_types=None)),  # the window on every layer
    ("gemma2", "base", dict(attn_scale=4.0)),  # sqrt(d_head), not sqrt(query_pre_attn_scalar)
    ("gemma3", "base", dict(rotary_base_local=None)),  # the global base on local layers
    ("gemma3", "base", dict(rotary_scaling_factor=1.0)),
    ("phi", "base", dict(rotary_dim=12)),
    ("phi", "base", dict(parallel_attn_mlp=False)),
    ("phi3", "base", dict(window_size=None)),
    ("phi3", "base", dict(rotary_dim=8)),
    ("olmo", "base", dict(clip_qkv=None)),
    ("olmo", "base", dict(eps=1e-2)),
    ("olmo2", "base", dict(eps=1e-2)),
    ("mixtral", "base", dict(experts_per_token=1)),
    ("mixtral", "base", dict(window_size=None)),
    ("gpt_neo", "base", dict(attn_scale=12**0.5)),  # GPT-Neo does not scale its scores
    ("gpt_neo", "base", dict(attn_types=None)),  # the window on every layer
    ("gpt_neo", "base", dict(window_size=5)),
    ("opt", "base", dict(norm_placement="post_residual")),
    ("opt", "base", dict(attn_scale=1.0)),  # HF scales the query by d_head^-0.5
    ("opt", "post_ln_project", dict(norm_placement="pre")),
    ("opt", "project_unbiased_weightless_untied", dict(act_fn="relu")),
    ("bloom", "base", dict(positional_embedding_type="standard")),  # no ALiBi bias
    ("bloom", "base", dict(residual_from_norm=True)),
    ("bloom", "residual_post_ln_six_heads_untied", dict(residual_from_norm=False)),
]


@pytest.mark.parametrize("family,variant,change", WRONG_SETTINGS, ids=lambda x: str(x))
def test_a_wrong_setting_fails_parity_by_a_wide_margin(family, variant, change):
    """The models are sensitive enough that each wrong setting misses the parity bound >= 30x."""
    hf = make_family(family, variant)
    params, cfg = _params_cfg(hf)
    tokens = random_tokens(2, 17, VOCAB)
    with torch.no_grad():
        expected, ref64 = hf(tokens).logits, float64_copy(hf)(tokens).logits
        bound = as_accurate_as_bound(expected, ref64)
        check(max_diff(fb.forward(params, tokens, cfg), ref64), bound, "right setting")
        check_above(max_diff(fb.forward(params, tokens, cfg.replace(**change)), ref64), 30 * bound, "wrong setting")


@pytest.mark.parametrize(
    "family,overrides,message",
    [
        ("llama", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'dynamic'"),
        ("llama", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                        "original_max_position_embeddings": 32}), "rope_type 'yarn'"),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
        ("llama", dict(hidden_act="mystery"), "hidden_act 'mystery'"),
        ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
         "partial_rotary_factor"),
        ("gpt_neox", dict(rotary_pct=0.25), "rotary dimension"),  # int(12 * 0.25) = 3 is odd
        ("gpt_neox", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0],
                                           "long_factor": [1.0], "partial_rotary_factor": 0.5}), "rope_type 'longrope'"),
        ("gptj", dict(rotary_dim=None), "rotary_dim=None"),
        ("gptj", dict(rotary_dim=5), "rotary_dim=5"),
        ("gptj", dict(activation_function="mystery"), "activation_function 'mystery'"),
        ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma3", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("gemma3", dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e3}}),
         "sliding_attention rope"),
        ("phi3", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 4,
                                       "long_factor": [2.0] * 4, "partial_rotary_factor": 1.0}, original_max_position_embeddings=32),
         "rope_type 'longrope'"),
        ("phi", dict(hidden_act="mystery"), "hidden_act 'mystery'"),
        ("gpt_neo", dict(activation_function="mystery"), "activation_function 'mystery'"),
        ("opt", dict(activation_function="mystery"), "activation_function 'mystery'"),
        ("bloom", dict(n_head=5), "divisible by n_head"),
        ("bloom", dict(pretraining_tp=2, slow_but_exact=True), "slow_but_exact"),
        ("gemma2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                         "original_max_position_embeddings": 32}), "rope_type 'yarn'"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)  # fmt: skip
def test_unsupported_options_are_refused_by_name(family, overrides, message):
    try:
        hf_config = family_config(family, **overrides)
    except Exception as error:  # HF's own validation refused it first: nothing to bridge
        pytest.skip(f"transformers {transformers.__version__} refuses this config itself: {error}")
    with pytest.raises(ValueError, match=message):
        fb.config_from_hf(hf_config)


def test_other_architectures_are_refused_with_the_supported_list():
    hf = transformers.FalconForCausalLM(transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ))  # fmt: skip
    with pytest.raises(fb.UnsupportedArchitectureError, match="'FalconForCausalLM'") as error:
        fb.Bridge.from_hf(hf)
    for architecture in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                         "Qwen3ForCausalLM", "GPTNeoXForCausalLM", "GPTJForCausalLM"):  # fmt: skip
        assert architecture in str(error.value)
        assert architecture in fb.supported_architectures()


@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_hf_from_tl_inverts_tl_weights(family, variant):
    """hf_from_tl(tl_weights(p)) == p bitwise, as new tensors; requesting every extra leaf adds
    only TL's zeros (or the tied head), so the logits stay the same. Where TL's view is not a view
    but arithmetic (Gemma: W_E * sqrt(d_model), norms w + 1), the inverse undoes it within its
    two roundings: |back - w| <= eps (|w| + 1) for the norms' (w + 1) - 1, <= 2 eps |w| for the
    embedding's (w * s) / s."""
    hf = make_family(family, variant)
    params, cfg = _params_cfg(hf)
    fam = family_for(cfg)
    tl = fam.tl_weights(params, cfg)
    back = fam.hf_from_tl(tl, cfg, ())
    assert list(back) == list(params)
    arithmetic = rounded_leaves(cfg)
    assert bool(arithmetic) == family.startswith("gemma"), arithmetic
    viewed = {t.untyped_storage().data_ptr() for t in tl.values()}
    assert {name for name, value in params.items() if value.untyped_storage().data_ptr() not in viewed} <= arithmetic
    for name, value in params.items():
        if name in arithmetic:
            bound = eps(value.dtype) * (value.abs() + 1) if value.dim() == 1 else 2 * eps(value.dtype) * value.abs()
            assert ((back[name] - value).abs() <= bound).all(), name
        else:
            assert torch.equal(back[name], value), name
        assert back[name].untyped_storage().data_ptr() != value.untyped_storage().data_ptr(), name
        assert back[name].is_contiguous(), name
    extras = list(fam.extra_param_shapes(cfg))[::-1]
    full = fam.hf_from_tl(tl, cfg, extras)
    assert list(full) == list(params) + extras[::-1]
    fb.check_params(full, cfg)
    tokens = random_tokens(2, 9, VOCAB)
    with torch.no_grad():
        ref64 = fb.forward(float64(params), tokens, cfg)
        assert_as_accurate_as(fb.forward(full, tokens, cfg), fb.forward(params, tokens, cfg), ref64)
    with pytest.raises(ValueError, match="no extra leaf"):
        fam.hf_from_tl(tl, cfg, ["mystery.weight"])


@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_tl_derived_keys_name_copies_that_writes_must_not_use(family, variant):
    """Each derived key equals (an expansion of) its source; hf_from_tl reads the sources only,
    so a change to a derived key changes nothing and a change to its source does."""
    hf = make_family(family, variant)
    params, cfg = _params_cfg(hf)
    fam = family_for(cfg)
    tl = fam.tl_weights(params, cfg)
    derived = fam.tl_derived_keys(cfg)
    if cfg.n_key_value_heads is not None:
        assert "blocks.0.attn.W_K" in derived and "blocks.0.attn._W_K" in tl
    # the zero biases' slots too, so their _b_K/_b_V sources are read; not an untied head (which reads W_U)
    extras = [name for name in fam.extra_param_shapes(cfg) if name not in fam.tied_aliases(cfg)]
    unedited = fam.hf_from_tl(tl, cfg, extras)
    for key, source in derived.items():  # a tied W_U is the embedding leaf (Gemma's W_E is scaled)
        expected = params[fam.tied_aliases(cfg)["lm_head.weight"]].T if key == "unembed.W_U" else tl[source]
        expected = expected.repeat_interleave(tl[key].shape[0] // expected.shape[0], dim=0)
        assert torch.equal(tl[key], expected), key
        edited = dict(tl)
        edited[key] = tl[key] + 1
        assert all(torch.equal(a, b) for a, b in zip(fam.hf_from_tl(edited, cfg, extras).values(), unedited.values())), key
        edited = dict(tl)
        edited[source] = tl[source] + 1
        assert not all(torch.equal(a, b) for a, b in zip(fam.hf_from_tl(edited, cfg, extras).values(), unedited.values())), source


@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_tl_biases_are_the_hf_biases_or_zeros(family, variant):
    """Where HF has a projection bias (attention_bias=True, Qwen2's qkv, NeoX, GPT-J's lm_head)
    the TL bias is a view of it; elsewhere a zero (TL 3.9's converters give zeros)."""
    hf = make_family(family, variant)
    params, cfg = _params_cfg(hf)
    tl = fb.tl_weights(params, cfg)
    for layer in range(cfg.n_layers):
        b_Q, b_O = tl[f"blocks.{layer}.attn.b_Q"], tl[f"blocks.{layer}.attn.b_O"]
        assert b_Q.shape == (cfg.n_heads, cfg.d_head) and b_O.shape == (cfg.d_model,)
        assert bool(b_Q.abs().sum() > 0) == cfg.qkv_bias
        assert bool(b_O.abs().sum() > 0) == cfg.attn_out_bias
        if cfg.qkv_bias:
            assert any(b_Q.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in params.values())


@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_to_hf_runs_the_same_model(family, variant):
    hf = make_family(family, variant)
    bridge = fb.Bridge.from_hf(hf)
    rebuilt = bridge.to_hf()
    assert all(a is b for (_, a), (_, b) in zip(rebuilt.named_parameters(), hf.named_parameters()))
    tokens = random_tokens(2, 9, VOCAB)
    with torch.no_grad():
        assert_as_accurate_as(rebuilt(tokens).logits, hf(tokens).logits, float64_copy(hf)(tokens).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_hook_names_and_shapes(family):
    hf = make_family(family)
    bridge = fb.Bridge.from_hf(hf)
    cfg = bridge.cfg
    tokens = random_tokens(2, 7, VOCAB)
    _, cache = bridge.run_with_cache(tokens)
    assert list(cache) == fb.hook_names(cfg)
    rotary = cfg.positional_embedding_type == "rotary"
    assert ("hook_pos_embed" in cache) == (cfg.positional_embedding_type == "standard") == (family in ("gpt_neo", "opt"))
    assert ("blocks.1.attn.hook_rot_q" in cache) == rotary
    if rotary:
        assert cache["blocks.1.attn.hook_rot_q"].shape == (2, 7, cfg.n_heads, cfg.d_head)
        assert cache["blocks.1.attn.hook_rot_k"].shape == (2, 7, cfg.n_kv_heads, cfg.d_head)
    assert ("blocks.0.attn.q_norm.hook_scale" in cache) == cfg.use_qk_norm == (family in ("qwen3", "gemma3", "olmo2"))
    assert ("blocks.0.ln1_post.hook_scale" in cache) == (cfg.norm_placement == "pre_post")
    assert ("blocks.0.mlp.hook_pre_linear" in cache) == (cfg.gated_mlp and cfg.num_experts is None)
    assert ("blocks.0.mlp.experts.0.hook_post" in cache) == (family == "mixtral")
    assert ("blocks.0.hook_resid_mid" in cache) != cfg.parallel_attn_mlp


def test_opt_350m_shape_hooks_read_the_post_ln_stream_and_the_projections():
    """OPT-350m's shape (post-LN, project_in/out, no final norm): ln1/ln2 hooks on the residual
    sums, whose outputs are the stream HF's layers return; no ln_final hooks; hook_embed after
    project_in (d_model), unembed.hook_in after project_out (d_embed), as HF's last hidden state."""
    hf = make_family("opt", "post_ln_project")
    bridge = fb.Bridge.from_hf(hf)
    cfg = bridge.cfg
    assert (cfg.norm_placement, cfg.final_norm, cfg.word_embed_proj_dim) == ("post_residual", False, 32)
    tokens = random_tokens(2, 9, VOCAB)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        out = hf.model.decoder(tokens, output_hidden_states=True)
        out64 = float64_copy(hf).model.decoder(tokens, output_hidden_states=True)
    assert list(cache) == fb.hook_names(cfg) and not any(name.startswith("ln_final") for name in cache)
    assert "blocks.0.ln1.hook_normalized" in cache and "blocks.0.ln2.hook_scale" in cache
    assert cache["hook_embed"].shape == (2, 9, 48) and cache["unembed.hook_in"].shape == (2, 9, 32)
    ours = {f"blocks.{layer}.hook_resid_post": cache[f"blocks.{layer}.hook_resid_post"] for layer in range(cfg.n_layers)}
    ours["unembed.hook_in"] = cache["unembed.hook_in"]
    hf_acts = {f"blocks.{layer}.hook_resid_post": out.hidden_states[layer + 1] for layer in range(cfg.n_layers - 1)}
    ref_acts = {f"blocks.{layer}.hook_resid_post": out64.hidden_states[layer + 1] for layer in range(cfg.n_layers - 1)}
    hf_acts["unembed.hook_in"], ref_acts["unembed.hook_in"] = out.last_hidden_state, out64.last_hidden_state
    _as_accurate_or_rounding(ours, hf_acts, ref_acts, forward_depth(cfg, 9), what="activation")


def test_opt_logit_attrs_go_through_project_out():
    """A token's residual direction behind OPT's project_out is project_out.W @ W_U[:, token]:
    with weightless norms and no biases the whole stream's logit attribution is HF's logit."""
    hf = make_family("opt", "project_unbiased_weightless_untied")
    bridge = fb.Bridge.from_hf(hf)
    tokens, token = random_tokens(2, 7, VOCAB), 5
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        attrs = cache.logit_attrs(cache.accumulated_resid(), tokens=token)  # [n_layers + 1, batch, pos]
        expected, ref64 = hf(tokens).logits[..., token], float64_copy(hf)(tokens).logits[..., token]
    assert bridge.tokens_to_residual_directions(token).shape == (bridge.cfg.d_model,)
    _as_accurate_or_rounding(attrs[-1], expected, ref64, forward_depth(bridge.cfg, 7), what="logit attribution")


@pytest.mark.parametrize("family", FAMILIES)
def test_vmap_grad_per_example_equals_a_loop(family):
    """Per-example gradients of padded rows of different lengths equal each row's gradient
    computed alone, unpadded."""
    hf = make_family(family)
    params, cfg = _params_cfg(hf)
    tokens, mask = padded_batch(VOCAB, [9, 4, 7, 2], "left")

    def loss(p, row, row_mask):
        logits = fb.forward(p, row, cfg, attention_mask=row_mask)[0]  # [pos, d_vocab]
        logp = logits[:-1].log_softmax(-1).gather(-1, row[1:, None])[:, 0]
        pairs = (row_mask[:-1] * row_mask[1:]).to(logp.dtype)
        return -(logp * pairs).sum() / pairs.sum()

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, tokens, mask)
    for row in range(len(tokens)):
        real = mask[row].bool()
        alone = grad(loss)(params, tokens[row][real], mask[row][real])
        alone64 = grad(loss)(float64(params), tokens[row][real], mask[row][real])
        _as_accurate_or_rounding({name: value[row] for name, value in batched.items()}, alone, alone64,
                                 forward_depth(cfg, 9), what=f"row {row}", shared_scale=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_vmapped_ensemble_equals_each_member(family):
    members = [_params_cfg(make_family(family, seed=seed))[0] for seed in range(3)]
    cfg = fb.config_from_hf(family_config(family))
    tokens = random_tokens(2, 11, VOCAB)
    with torch.no_grad():
        logits = vmap(fb.forward, in_dims=(0, None, None))(fb.stack_params(members), tokens, cfg)
        for member, params in enumerate(members):
            ref64 = fb.forward(float64(params), tokens, cfg)
            assert_as_accurate_as(logits[member], fb.forward(params, tokens, cfg), ref64, what=f"member {member}")


@pytest.mark.slow
def test_compiled_forward_equals_eager():
    """fullgraph torch.compile through rotary tables, per-head q/k norms, grouped-query
    attention and per-layer sliding windows, with left padding."""
    torch._dynamo.reset()
    hf = make_family("qwen3", num_hidden_layers=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    params, cfg = _params_cfg(hf)
    assert cfg.attn_types == ("global", "local") and cfg.n_key_value_heads == 2
    tokens, mask = padded_batch(VOCAB, [9, 6], "left")
    compiled = torch.compile(fb.forward, fullgraph=True)
    with torch.no_grad():
        eager = fb.forward(params, tokens, cfg, attention_mask=mask)
        ref64 = fb.forward(float64(params), tokens, cfg, attention_mask=mask)
        assert_as_accurate_as(compiled(params, tokens, cfg, attention_mask=mask), eager, ref64)
