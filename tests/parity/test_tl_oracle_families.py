"""The rotary families' TL weights and every cached activation against TransformerLens 3.9.

HookedTransformerConfig is built by hand from the HF config, mirroring TL's
loading_from_pretrained mapping, except where that mapping is wrong for a config tested here
and HookedTransformer itself supports the right value: an explicit head_dim (TL's Llama branch
uses hidden_size // n_heads), GPT-J's n_inner and layer_norm_epsilon (TL uses 4 * n_embd and
1e-5), Qwen2/Qwen3 sliding-window layers (TL's mapping ignores them; its attn_types takes them),
and linear rope scaling (rotary_scaling_factor). Configs HookedTransformer 3.9 cannot run are
left out: attention biases in Llama/Qwen3 (TL's converters drop them: zeros) and GPT-NeoX with
attention_bias=False (convert_neox_weights reads the missing bias).
"""

import pytest
import torch

import functional_bridge as fb
from family_helpers import VOCAB, make_family
from functional_bridge.architectures import family_for
from helpers import assert_caches_equal, max_diff, padding_mask, random_tokens, routed_rows
from tolerance import assert_rounding_close, forward_depth

pytestmark = pytest.mark.oracle

ORACLE_VARIANTS = [
    ("llama", "base"), ("llama", "linear_rope"), ("llama", "llama3_rope"), ("mistral", "base"), ("mistral", "no_window"),
    ("qwen2", "base"), ("qwen2", "mha_tied"), ("qwen3", "base"), ("gpt_neox", "base"), ("gpt_neox", "sequential_tied"),
    ("gptj", "base"), ("gptj", "full_rotary_tied"), ("gemma", "base"), ("gemma2", "base"), ("gemma3", "base"),
    ("gemma3", "capped_mha_untied"), ("phi", "base"), ("phi3", "base"), ("phi3", "mha_tied"),
    ("olmo", "base"), ("olmo2", "base"), ("mixtral", "base"), ("gpt_neo", "base"), ("gpt_neo", "global_untied"),
    ("opt", "base"), ("bloom", "base"),
]  # fmt: skip
BIASED_VARIANTS = [("llama", "mha_tied_bias"), ("qwen3", "mha_bias_window"), ("gemma", "mha_bias_untied")]
# TL 3.9 computes NTK-by-parts (llama3) inverse frequencies in float32 whatever the model's dtype
# (AbstractAttention.calculate_sin_cos_rotary), so a float64 run agrees with it to float32 rounding.
FLOAT32_FREQUENCIES = [("llama", "llama3_rope")]
# TL 3.9's (and HF's) MoE router takes its softmax in float32 whatever the model's dtype; ours in
# float64 for a float64 model (hook_expert_weights is float64 here, float32 there).
FLOAT32_ROUTER = [("mixtral", "base")]
# TL 3.9's convert_gemma_weights computes Gemma's (1 + w) norm weights in float32 whatever the
# model's dtype (tl_weights keeps float64 leaves float64).
FLOAT32_NORMS = [(family, variant) for family, variant in ORACLE_VARIANTS if family.startswith("gemma")]
# TL 3.9 builds its ALiBi bias in float32 whatever the model's dtype (create_alibi_bias).
FLOAT32_ALIBI = [("bloom", "base")]
CONVERTERS = {
    "LlamaForCausalLM": "llama.convert_llama_weights", "MistralForCausalLM": "mistral.convert_mistral_weights",
    "Qwen2ForCausalLM": "qwen2.convert_qwen2_weights", "Qwen3ForCausalLM": "qwen3.convert_qwen3_weights",
    "GPTNeoXForCausalLM": "neox.convert_neox_weights", "GPTJForCausalLM": "gptj.convert_gptj_weights",
    "GemmaForCausalLM": "gemma.convert_gemma_weights", "Gemma2ForCausalLM": "gemma.convert_gemma_weights",
    "Gemma3ForCausalLM": "gemma.convert_gemma_weights", "PhiForCausalLM": "phi.convert_phi_weights",
    "Phi3ForCausalLM": "phi3.convert_phi3_weights", "OlmoForCausalLM": "olmo.convert_olmo_weights",
    "Olmo2ForCausalLM": "olmo2.convert_olmo2_weights", "MixtralForCausalLM": "mixtral.convert_mixtral_weights",
    "GPTNeoForCausalLM": "neo.convert_neo_weights", "OPTForCausalLM": "opt.convert_opt_weights",
    "BloomForCausalLM": "bloom.convert_bloom_weights",
}  # fmt: skip
# Keys TL 3.9's converter gets wrong, left out of the bitwise comparison: convert_phi3_weights
# writes ln1.b/ln2.b as zeros of shape [d_vocab] for an RMSNorm model that has no norm biases.
CONVERTER_BUGS = {"Phi3ForCausalLM": ("ln1.b", "ln2.b")}
# TL keys of ours that TL 3.9 has no place for: OPT's two position rows before position 0 (its
# converter slices them off; ours keeps them so that the TL view inverts exactly).
NOT_IN_TL = {"OPTForCausalLM": ("pos_embed.W_pos_offset",)}


def _rope(c) -> dict:
    params = dict(getattr(c, "rope_parameters", None) or {})
    theta = getattr(c, "rope_theta", None)  # TL's _get_rope_theta: the attribute, then the dict
    params["rope_theta"] = theta if theta is not None else params.get("rope_theta", 10000.0)
    return params


def _llama_like(hf) -> dict:
    c, arch = hf.config, type(hf).__name__
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    n_kv = c.num_key_value_heads
    rope = _rope(c)
    fields = dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, normalization_type="RMS", positional_embedding_type="rotary",
        rotary_adjacent_pairs=False, rotary_dim=d_head, rotary_base=rope["rope_theta"], final_rms=True,
        gated_mlp=True, use_qk_norm=arch == "Qwen3ForCausalLM",
        n_key_value_heads=n_kv if arch in ("MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM") or n_kv != c.num_attention_heads else None,
    )  # fmt: skip
    if rope.get("rope_type") == "llama3":  # TL's _apply_llama3_rope_scaling
        fields.update(
            use_NTK_by_parts_rope=True, NTK_original_ctx_len=rope["original_max_position_embeddings"],
            NTK_by_parts_low_freq_factor=rope["low_freq_factor"], NTK_by_parts_high_freq_factor=rope["high_freq_factor"],
            NTK_by_parts_factor=rope["factor"],
        )  # fmt: skip
    if rope.get("rope_type") == "linear":
        fields["rotary_scaling_factor"] = rope["factor"]
    if arch == "MixtralForCausalLM":
        fields.update(num_experts=c.num_local_experts, experts_per_token=c.num_experts_per_tok, norm_topk_prob=True)
    if arch in ("MistralForCausalLM", "MixtralForCausalLM") and c.sliding_window:
        fields.update(use_local_attn=True, window_size=c.sliding_window, attn_types=["local"] * c.num_hidden_layers)
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and c.sliding_window is not None:
        types = ["local" if t == "sliding_attention" else "global" for t in c.layer_types]
        fields.update(use_local_attn=True, window_size=c.sliding_window, attn_types=types)
    return fields


def _neox(hf) -> dict:
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rope = _rope(c)
    return dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, use_attn_scale=True, parallel_attn_mlp=c.use_parallel_residual,
        positional_embedding_type="rotary", rotary_adjacent_pairs=False, normalization_type="LN",
        rotary_dim=round(rope.get("partial_rotary_factor", getattr(c, "rotary_pct", 1.0)) * d_head),
        rotary_base=rope["rope_theta"],
    )  # fmt: skip


def _gptj(hf) -> dict:
    c = hf.config
    return dict(
        d_model=c.n_embd, d_head=c.n_embd // c.n_head, n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
        n_layers=c.n_layer, n_ctx=c.n_positions, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
        act_fn=c.activation_function, use_attn_scale=True, parallel_attn_mlp=True, positional_embedding_type="rotary",
        rotary_dim=c.rotary_dim, rotary_adjacent_pairs=True, normalization_type="LN",
    )  # fmt: skip


def _gemma(hf) -> dict:
    """TL's Gemma mapping (loading_from_pretrained's per-model dicts), from the HF config: GeGLU,
    always-grouped K/V, Gemma 2/3's pre-and-post norms, windows and soft caps (Gemma 3's
    attention cap is not applied by HF, so not set), Gemma 3's q/k norms and per-layer-type rope
    (a local base; linear scaling on global layers only)."""
    c, arch = hf.config, type(hf).__name__
    generation = {"GemmaForCausalLM": 1, "Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 3}[arch]
    fields = dict(
        d_model=c.hidden_size, d_head=c.head_dim, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act if generation == 1 else c.hidden_activation, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=c.head_dim, use_attn_scale=True, gated_mlp=True, final_rms=True,
        attn_scale=(c.head_dim if generation == 1 else c.query_pre_attn_scalar) ** 0.5, n_key_value_heads=c.num_key_value_heads,
    )  # fmt: skip
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    fields["rotary_base"] = rope["rope_theta"]
    if generation > 1:
        types = ["local" if t == "sliding_attention" else "global" for t in c.layer_types]
        fields.update(use_normalization_before_and_after=True, use_local_attn=True, window_size=c.sliding_window, attn_types=types)
        if c.final_logit_softcapping is not None:
            fields["output_logits_soft_cap"] = c.final_logit_softcapping
    if generation == 2:
        fields["attn_scores_soft_cap"] = c.attn_logit_softcapping
    if generation == 3:
        fields.update(use_qk_norm=True, rotary_base_local=c.rope_parameters["sliding_attention"]["rope_theta"])
        if rope.get("rope_type") == "linear":
            fields["rotary_scaling_factor"] = rope["factor"]
    return fields


def _phi(hf) -> dict:
    """TL's PhiForCausalLM mapping: a parallel LayerNorm block, round(partial factor * d_head)."""
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rope = _rope(c)
    return dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, normalization_type="LN", positional_embedding_type="rotary", rotary_base=rope["rope_theta"],
        use_attn_scale=True, parallel_attn_mlp=True, rotary_dim=round(rope["partial_rotary_factor"] * d_head),
    )  # fmt: skip


def _phi3(hf) -> dict:
    """TL's Phi3ForCausalLM mapping, with the partial rotary factor its mapping drops (it sets
    rotary_dim = d_head) and a window on every layer."""
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    rope = _rope(c)
    fields = dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps, d_vocab=c.vocab_size,
        act_fn=c.hidden_act, normalization_type="RMS", positional_embedding_type="rotary", rotary_base=rope["rope_theta"],
        use_attn_scale=True, gated_mlp=True, rotary_dim=int(d_head * rope.get("partial_rotary_factor", 1.0)),
        n_key_value_heads=c.num_key_value_heads if c.num_key_value_heads != c.num_attention_heads else None,
    )  # fmt: skip
    if c.sliding_window:
        fields.update(use_local_attn=True, window_size=c.sliding_window, attn_types=["local"] * c.num_hidden_layers)
    return fields


def _olmo(hf) -> dict:
    """TL's OLMo/OLMo 2 mapping (its per-model dicts): OLMo's weightless LayerNorms as "LN" with
    unit weights, clip_qkv; OLMo 2 as "RMS" (TL keys its post-norms and all-heads q/k norms off
    the architecture name)."""
    c, olmo2 = hf.config, type(hf).__name__ == "Olmo2ForCausalLM"
    d_head = c.hidden_size // c.num_attention_heads
    fields = dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn=c.hidden_act,
        rotary_base=_rope(c)["rope_theta"], rotary_dim=d_head, positional_embedding_type="rotary", gated_mlp=True,
        normalization_type="RMS" if olmo2 else "LN", eps=c.rms_norm_eps if olmo2 else 1e-5,
    )  # fmt: skip
    if not olmo2:
        fields["clip_qkv"] = c.clip_qkv
    return fields


def _gpt_neo(hf) -> dict:
    """TL's GPTNeoForCausalLM mapping (unscaled attention, attn_types from attention_layers),
    with d_mlp from intermediate_size (TL's mapping uses 4 * d_model)."""
    c = hf.config
    return dict(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_heads, n_heads=c.num_heads, d_mlp=c.intermediate_size or 4 * c.hidden_size,
        n_layers=c.num_layers, n_ctx=c.max_position_embeddings, eps=c.layer_norm_epsilon, d_vocab=c.vocab_size,
        attn_types=c.attention_layers, act_fn=c.activation_function, use_attn_scale=False, use_local_attn=True,
        window_size=c.window_size, normalization_type="LN",
    )  # fmt: skip


def _opt(hf) -> dict:
    """TL's OPTForCausalLM mapping (pre-LN OPT only: TL 3.9 has no post-LN blocks, projections or
    weightless norms)."""
    c = hf.config
    return dict(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads, d_mlp=c.ffn_dim,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, eps=1e-5, d_vocab=c.vocab_size,
        act_fn=c.activation_function, use_attn_scale=True, use_local_attn=False, scale_attn_by_inverse_layer_idx=False,
        normalization_type="LN",
    )  # fmt: skip


def _bloom(hf) -> dict:
    """TL's BloomForCausalLM mapping: ALiBi, the embedding LayerNorm, gelu_fast, d_mlp 4 * d_model."""
    c = hf.config
    return dict(
        d_model=c.hidden_size, d_head=c.hidden_size // c.n_head, n_heads=c.n_head, d_mlp=4 * c.hidden_size, n_layers=c.n_layer,
        n_ctx=2048, d_vocab=c.vocab_size, act_fn="gelu_fast", eps=c.layer_norm_epsilon, normalization_type="LN",
        post_embedding_ln=True, positional_embedding_type="alibi",
    )  # fmt: skip


def tl_config(hf, transformer_lens):
    arch = type(hf).__name__
    builders = {"GPTNeoXForCausalLM": _neox, "GPTJForCausalLM": _gptj, "PhiForCausalLM": _phi, "Phi3ForCausalLM": _phi3}
    builders.update(OlmoForCausalLM=_olmo, Olmo2ForCausalLM=_olmo, GPTNeoForCausalLM=_gpt_neo, OPTForCausalLM=_opt, BloomForCausalLM=_bloom)
    builders.update(dict.fromkeys(("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"), _gemma))
    fields = builders.get(arch, _llama_like)(hf)
    dtype = next(hf.parameters()).dtype
    return transformer_lens.HookedTransformerConfig(original_architecture=arch, dtype=dtype, **fields)


def tl_conversion(hf, transformer_lens):
    import importlib

    module, function = CONVERTERS[type(hf).__name__].split(".")
    converter = getattr(importlib.import_module(f"transformer_lens.pretrained.weight_conversions.{module}"), function)
    return converter(hf, tl_config(hf, transformer_lens))


def hooked_transformer(hf, transformer_lens):
    """HookedTransformer built from the same HF weights, no processing. TL 3.9's
    load_and_process_state_dict round-trips every float64 tensor through float32, its own
    rotary tables included; the tables it built at construction are put back, so a float64
    model is float64 throughout (the weights here are float32 values, unchanged by the trip)."""
    model = transformer_lens.HookedTransformer(tl_config(hf, transformer_lens))
    tables = {name: buffer.clone() for name, buffer in model.named_buffers() if "rotary" in name}
    state = dict(tl_conversion(hf, transformer_lens))  # TL pops keys from the dict it is given
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    for name, table in tables.items():
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, table)
    if model.cfg.num_experts:  # TL builds its MoE's nn.Linear router and experts in float32 whatever cfg.dtype
        for block in model.blocks:
            block.mlp.to(model.cfg.dtype)
    return model.eval()


@pytest.mark.parametrize("family,variant", ORACLE_VARIANTS + BIASED_VARIANTS)
def test_tl_weights_equal_the_conversion_and_hooked_transformer(transformer_lens, family, variant):
    """Every key of TL 3.9's converter, same shape and value; the only extra keys are
    HookedTransformer's expanded grouped-query W_K/W_V/b_K/b_V, equal to its properties. For
    the biased variants TL's converter gives zeros where HF has biases; those are compared with
    the HF biases instead."""
    hf = make_family(family, variant)
    bridge = fb.Bridge.from_hf(hf)
    expected = tl_conversion(hf, transformer_lens)
    ours = bridge.tl_parameters()
    expanded = {k for k in family_for(bridge.cfg).tl_derived_keys(bridge.cfg) if k != "unembed.W_U"}
    wrong = CONVERTER_BUGS.get(type(hf).__name__, ())
    expected = {k: v for k, v in expected.items() if k.split(".", 2)[-1] not in wrong}
    # zero biases some converters omit (OLMo's b_Q..., Phi-3's b_in..., BLOOM's b_U): HookedTransformer's own zeros
    hooked_zeros = {k for k in ours if k not in expected and k.rsplit(".", 1)[-1] in ("b_Q", "b_K", "b_V", "b_in", "b_out", "b_U") and not ours[k].any()}
    assert set(ours) == set(expected) | {k for k in expanded if ".attn." in k} | hooked_zeros | set(NOT_IN_TL.get(type(hf).__name__, ()))
    biased = (family, variant) in BIASED_VARIANTS
    for name, value in expected.items():
        assert ours[name].shape == value.shape, name
        if biased and name.split(".")[-1] in ("b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_O"):
            continue
        assert torch.equal(ours[name], value), name
    if (family, variant) in BIASED_VARIANTS:
        return
    model = hooked_transformer(hf, transformer_lens)
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out", "W_E", "W_U"):
        if name == "W_gate" and not bridge.cfg.gated_mlp:
            continue
        if name in ("W_in", "W_gate", "W_out") and bridge.cfg.num_experts:  # per expert: no stacked MLP weights in TL either
            continue
        assert torch.equal(getattr(bridge, name), getattr(model, name)), name


@pytest.mark.parametrize("family,variant", [("llama", "base"), ("gpt_neox", "base"), ("gptj", "base")])
def test_tl_weights_are_differentiable_views_of_the_leaves(family, variant):
    hf = make_family(family, variant)
    bridge = fb.Bridge.from_hf(hf)
    tl = bridge.tl_parameters()
    key = "blocks.1.attn._W_K" if bridge.cfg.n_key_value_heads else "blocks.1.attn.W_K"
    leaf = next(p for p in bridge.parameters() if p.untyped_storage().data_ptr() == tl[key].untyped_storage().data_ptr())
    (grad,) = torch.autograd.grad(tl[key][0, 5, 3], leaf)
    assert grad.abs().sum() == 1


def _max_shifted_scores(name: str, x: torch.Tensor) -> torch.Tensor:
    """Attention scores [batch, head, query_pos, key_pos] less each row's largest finite score.
    Right padding with ALiBi: at a padding query TL's bias counts the query's index in the padded
    row, the bridge its position among real tokens (the last real one's), a constant per row that
    softmax ignores (the patterns, compared as they are, agree); real rows are compared unshifted
    with no padding and with left padding."""
    if not name.endswith("hook_attn_scores"):
        return x
    row_max = x.masked_fill(~x.isfinite(), float("-inf")).amax(-1, keepdim=True)
    return x - row_max.masked_fill(~row_max.isfinite(), 0.0)


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("family,variant", ORACLE_VARIANTS)
def test_every_cached_activation_equals_hooked_transformer(transformer_lens, family, variant, padding):
    """In float64 (both models), so that the bound is float64 rounding (see FLOAT32_FREQUENCIES)
    and measures the semantics rather than float32 rounding of differently ordered sums: the
    sharpened attention scores reach ~20, where float32's spacing is 2e-6."""
    hf = make_family(family, variant).double()
    bridge = fb.Bridge.from_hf(hf)
    model = hooked_transformer(hf, transformer_lens)
    tokens = random_tokens(3, 12, VOCAB)
    mask = padding_mask([12, 9, 7], padding) if padding else None
    precision = torch.float32 if (family, variant) in FLOAT32_FREQUENCIES + FLOAT32_ROUTER + FLOAT32_NORMS + FLOAT32_ALIBI else torch.float64
    adapt = routed_rows(bridge.cfg) if bridge.cfg.num_experts else None
    align = _max_shifted_scores if bridge.cfg.positional_embedding_type == "alibi" and padding == "right" else None
    logits, cache, tl_logits = assert_caches_equal(bridge, model, tokens, mask, float64_precision=precision, adapt=adapt, align=align)
    assert logits.dtype == tl_logits.dtype == torch.float64
    assert list(cache) == fb.hook_names(bridge.cfg)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox", "gptj", "gemma2", "gemma3"])
def test_run_with_hooks_edits_like_hooked_transformer(transformer_lens, family):
    """Edits at ln1 (which GPT-J's MLP must not see: TL's ln2 is a separate, tied norm), at a
    rotated key (grouped-query heads for Llama/Qwen3/Gemma), at the k_norm scale (Qwen3, Gemma 3)
    and at Gemma's post-attention norm. float64, as above."""
    hf = make_family(family).double()
    bridge = fb.Bridge.from_hf(hf)
    model = hooked_transformer(hf, transformer_lens)
    tokens = random_tokens(2, 10, VOCAB)

    def double(x, hook):
        return x * 2

    def ablate_head(x, hook):
        x = x.clone()
        x[:, :, 0] = 0
        return x

    hooks = [("blocks.0.ln1.hook_normalized", double), ("blocks.1.attn.hook_rot_k", ablate_head)]
    if bridge.cfg.use_qk_norm:
        hooks.append(("blocks.2.attn.k_norm.hook_scale", double))
    if bridge.cfg.norm_placement == "pre_post":
        hooks.append(("blocks.1.ln1_post.hook_normalized", double))
    with torch.no_grad():
        ours = bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        theirs = model.run_with_hooks(tokens, fwd_hooks=hooks)
        plain = bridge(tokens)
    precision = torch.float32 if (family, "base") in FLOAT32_NORMS else torch.float64
    assert_rounding_close(ours, theirs, n=forward_depth(bridge.cfg, tokens.shape[1]), dtype=precision)
    assert max_diff(ours, plain) > 1e-3
