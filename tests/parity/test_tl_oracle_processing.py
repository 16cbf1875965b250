"""Processing and TL edits against TransformerLens 3.9 itself, for every registered family:
HookedTransformer's load_and_process_state_dict with the same options (its processed state dict
and run_with_cache), ProcessWeights.process_weights for 16-bit weights, run_with_hooks for
ablations."""

import dataclasses

import pytest
import torch

import functional_bridge as fb
from helpers import assert_caches_equal, hooked_float64, make_gpt2, max_diff, padding_mask, random_tokens, routed_rows
from tolerance import assert_as_accurate_as
from test_tl_oracle_gpt2 import tl_config, tl_conversion
from tiny_models import causal_lm_architectures, tiny_model

pytestmark = pytest.mark.oracle

OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases", "refactor_factored_attn_matrices")
COMBOS = {
    "all": {option: option != "refactor_factored_attn_matrices" for option in OPTIONS},
    "all_and_refactor": dict.fromkeys(OPTIONS, True),
    "none": dict.fromkeys(OPTIONS, False),
    **{name: {option: option == name for option in OPTIONS} for name in OPTIONS},
}


# HF class -> TL 3.9's conversion function (transformer_lens.pretrained.weight_conversions).
CONVERSIONS = {
    "GPT2LMHeadModel": "convert_gpt2_weights",
    "LlamaForCausalLM": "convert_llama_weights",
    "MistralForCausalLM": "convert_mistral_weights",
    "Qwen2ForCausalLM": "convert_qwen2_weights",
    "Qwen3ForCausalLM": "convert_qwen3_weights",
    "GPTNeoXForCausalLM": "convert_neox_weights",
    "GPTJForCausalLM": "convert_gptj_weights",
    "GemmaForCausalLM": "convert_gemma_weights",
    "Gemma2ForCausalLM": "convert_gemma_weights",
    "Gemma3ForCausalLM": "convert_gemma_weights",
    "PhiForCausalLM": "convert_phi_weights",
    "Phi3ForCausalLM": "convert_phi3_weights",
    "OlmoForCausalLM": "convert_olmo_weights",
    "Olmo2ForCausalLM": "convert_olmo2_weights",
    "MixtralForCausalLM": "convert_mixtral_weights",
    "GPTNeoForCausalLM": "convert_neo_weights",
    "OPTForCausalLM": "convert_opt_weights",
    "BloomForCausalLM": "convert_bloom_weights",
}


def hooked_config(cfg, transformer_lens):
    """HookedTransformerConfig from a BridgeConfig, whose fields carry TL's names where TL has
    them; TL's switches for the rest: local attention, Gemma 2/3's pre-and-post norms."""
    known = {field.name for field in dataclasses.fields(transformer_lens.HookedTransformerConfig)}
    fields = {k: v for k, v in cfg.to_dict().items() if k in known and v is not None}
    if cfg.attn_scale == cfg.d_head**0.5 or cfg.attn_scale == 1.0:
        fields.pop("attn_scale", None)  # TL derives it from d_head
    fields.pop("d_vocab_out", None)
    if cfg.window_size is not None:
        fields.update(use_local_attn=True, attn_types=list(cfg.attn_types or ["local"] * cfg.n_layers))
    fields["use_normalization_before_and_after"] = cfg.norm_placement == "pre_post"
    if cfg.num_experts is not None:  # Mixtral renormalises its top-k routing weights
        fields["norm_topk_prob"] = True
    if cfg.qk_norm_over_heads:  # TL builds OLMo 2's all-heads q/k norms from the architecture name
        fields["use_qk_norm"] = False
    return transformer_lens.HookedTransformerConfig(**fields, use_attn_scale=cfg.attn_scale != 1.0)


def processed_hooked_transformer(hf, transformer_lens, **options):
    from transformer_lens.pretrained import weight_conversions

    cfg = fb.config_from_hf(hf.config)
    if cfg.original_architecture not in CONVERSIONS:
        pytest.fail(f"add TL's conversion for {cfg.original_architecture} to CONVERSIONS")
    convert = getattr(weight_conversions, CONVERSIONS[cfg.original_architecture])
    # the options HookedTransformer.from_pretrained turns off (load_and_process_state_dict does not)
    if cfg.output_logits_soft_cap is not None:
        options["center_unembed"] = False
    if cfg.norm_placement in ("output", "post_residual"):
        options.update(fold_ln=False, center_writing_weights=False)
    model = transformer_lens.HookedTransformer(hooked_config(cfg, transformer_lens))
    model.load_and_process_state_dict(dict(convert(hf, model.cfg)), **options)  # TL pops keys
    return model.eval()


# Our TL keys HookedTransformer has no place for: OPT's two position rows before position 0.
NOT_IN_TL = ("pos_embed.W_pos_offset",)


def is_weight(key: str) -> bool:
    return key.rsplit(".", 1)[-1].lstrip("_").startswith(("W_", "b_"))


def assert_weights_equal(ours: dict, theirs: dict, model=None) -> None:
    """Every W_/b_ weight TL holds equals ours exactly (the arithmetic is TL's, op for op); a
    weight we lack is a bias our model does not add, so TL's must be zero. Our weights that are
    not in TL's state dict are HookedTransformer properties (grouped-query W_K) and equal them."""
    for key, value in theirs.items():
        if not is_weight(key):
            continue
        if key in ours:
            assert ours[key].shape == value.shape, key
            assert torch.equal(ours[key], value), (key, max_diff(ours[key], value))
        else:
            assert key.rsplit(".", 1)[-1].startswith("b_") and not value.any(), key
    for key in ours:
        if is_weight(key) and key not in theirs and key not in NOT_IN_TL:
            assert model is not None, key
            assert torch.equal(ours[key], hooked_attribute(model, key)), key


def hooked_attribute(model, key: str):
    """HookedTransformer's attribute for a TL key: "blocks.0.attn.W_K" -> model.blocks[0].attn.W_K."""
    obj = model
    for part in key.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_processed_model_equals_hooked_transformers(transformer_lens, arch, combo, tie):
    """The processed TL weights equal HookedTransformer's processed state dict, and every cached
    activation its run_with_cache, without padding and with left padding. With rotary
    embeddings both refuse refactor_factored_attn_matrices."""
    hf = tiny_model(arch, tie_word_embeddings=tie)
    bridge = fb.Bridge.from_hf(hf)
    options = COMBOS[combo]
    if options["refactor_factored_attn_matrices"] and bridge.cfg.positional_embedding_type == "rotary":
        with pytest.raises(AssertionError, match="rotary"):
            processed_hooked_transformer(hf, transformer_lens, **options)
        with pytest.raises(ValueError, match="rotary"):
            bridge.processed(**options)
        return
    processed = bridge.processed(**options)
    model = processed_hooked_transformer(hf, transformer_lens, **options)
    theirs = model.state_dict()
    if bridge.cfg.positional_embedding_type == "alibi":  # HookedTransformer builds a PosEmbed that ALiBi models never read
        del theirs["pos_embed.W_pos"]
    assert_weights_equal(fb.tl_weights(processed.params, processed.cfg), theirs, model)
    tokens = random_tokens(3, 12, bridge.cfg.d_vocab)
    mask = padding_mask([12, 9, 7], "left")
    adapt = routed_rows(bridge.cfg) if bridge.cfg.num_experts else None  # TL's per-expert hooks see routed rows
    assert_caches_equal(processed, model, tokens, None, adapt=adapt)
    assert_caches_equal(processed, model, tokens, mask, adapt=adapt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_weights_are_processed_in_float32_as_transformer_lens_does(transformer_lens, dtype):
    from transformer_lens.weight_processing import ProcessWeights

    hf = make_gpt2().to(dtype)
    bridge = fb.Bridge.from_hf(hf)
    options = COMBOS["all"]
    ours = fb.tl_weights(fb.process_weights(bridge.params, bridge.cfg, **options), bridge.cfg)
    state = dict(tl_conversion(hf, transformer_lens))
    state["unembed.b_U"] = torch.zeros(hf.config.vocab_size, dtype=dtype)  # HookedTransformer's fill
    theirs = ProcessWeights.process_weights(state, tl_config(hf, transformer_lens), **options)
    assert all(value.dtype == dtype for value in ours.values())
    assert_weights_equal(ours, theirs)


@pytest.mark.parametrize("processed", [False, True])
def test_zeroing_a_head_via_W_O_equals_hooked_transformers_hook_z_ablation(transformer_lens, processed):
    hf = make_gpt2()
    options = COMBOS["all" if processed else "none"]
    bridge = fb.Bridge.from_hf(hf).processed(**options)
    model = processed_hooked_transformer(hf, transformer_lens, **options)
    tokens = random_tokens(3, 10, hf.config.vocab_size)
    layer, head = 1, 2

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    W_O = bridge.W_O[layer].detach().clone()
    W_O[head] = 0
    bridge.set_tl_weights({f"blocks.{layer}.attn.W_O": W_O})
    with torch.no_grad():
        expected = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
        expected64 = hooked_float64(model).run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
        assert_as_accurate_as(bridge(tokens), expected, expected64)
        assert max_diff(model(tokens), expected) > 1e-3


def test_an_edit_then_an_optimizer_step_leaves_no_stale_view(transformer_lens):
    """After an in-place edit that unties the head and an AdamW step, the TL view equals TL's
    conversion of the HF model over the same tensors, exactly."""
    bridge = fb.Bridge.from_hf(make_gpt2())
    W_U = bridge.W_U.detach() * 2
    bridge.set_tl_weights({"unembed.W_U": W_U, "blocks.0.attn.W_O": torch.zeros_like(bridge.W_O[0])})
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    tokens = random_tokens(2, 8, bridge.cfg.d_vocab)
    bridge(tokens).logsumexp(-1).mean().backward()
    optimizer.step()
    assert max_diff(bridge.W_U, W_U) > 1e-3 and bridge.W_O[0].abs().max() > 1e-3
    hf = bridge.to_hf()
    expected = tl_conversion(hf, transformer_lens)
    ours = bridge.tl_parameters()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key
