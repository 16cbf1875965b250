"""Small random models of the families beyond GPT-2 (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX, GPT-J,
Gemma 1/2/3, ..., OPT, BLOOM) chosen to break lazy code: grouped-query attention, head_dim != d_model /
n_heads, odd layer counts, partial rotary other than the default fraction, sliding windows
shorter than the test sequences, non-default rotary bases, soft caps small enough to bind, and
weights perturbed so a wrong setting reaches the logits."""

from __future__ import annotations

import torch
import transformers as T

from tolerance import eps, float64_copy

VOCAB = 97
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=64)
# Gemma: d_model 64, so that sqrt(d_model) is exact in every dtype (TL's float64 scale and HF's
# float32 buffer then agree); three layers alternate local, global, local.
_GEMMA_LIKE = dict(_LLAMA_LIKE, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
_GEMMA_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]

# family -> variant -> (config class, fields). "base" is each family's hardest default case.
VARIANTS = {
    "llama": {
        "base": (T.LlamaConfig, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
        "mha_tied_bias": (T.LlamaConfig, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4,
                                              attention_bias=True, tie_word_embeddings=True)),
        "linear_rope": (T.LlamaConfig, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=3,
                                            rope_parameters={"rope_type": "linear", "rope_theta": 300.0, "factor": 3.0})),
        "llama3_rope": (T.LlamaConfig, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 1000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    },
    "mistral": {
        "base": (T.MistralConfig, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                       sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 700.0})),
        "no_window": (T.MistralConfig, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, sliding_window=None)),
    },
    "qwen2": {
        "base": (T.Qwen2Config, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                     sliding_window=5, max_window_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 900.0})),
        "mha_tied": (T.Qwen2Config, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)),
    },
    "qwen3": {
        "base": (T.Qwen3Config, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                                     rope_parameters={"rope_type": "default", "rope_theta": 600.0})),
        "mha_bias_window": (T.Qwen3Config, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                                                attention_bias=True, use_sliding_window=True, sliding_window=4,
                                                max_window_layers=0)),
    },
    "gpt_neox": {
        "base": (T.GPTNeoXConfig, dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                       num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                                       rotary_emb_base=800)),
        "sequential_tied": (T.GPTNeoXConfig, dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                  num_attention_heads=3, max_position_embeddings=64, rotary_pct=0.75,
                                                  use_parallel_residual=False, tie_word_embeddings=True, hidden_act="gelu_new")),
        "no_attention_bias": (T.GPTNeoXConfig, dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                                    num_attention_heads=3, max_position_embeddings=64, attention_bias=False)),
    },
    "gptj": {
        "base": (T.GPTJConfig, dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, rotary_dim=6, n_inner=72, n_positions=64)),
        "full_rotary_tied": (T.GPTJConfig, dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, rotary_dim=12,
                                                n_positions=64, tie_word_embeddings=True, activation_function="gelu")),
    },
    "gemma": {
        "base": (T.GemmaConfig, dict(_GEMMA_LIKE, rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
        "mha_bias_untied": (T.GemmaConfig, dict(_GEMMA_LIKE, num_key_value_heads=4, head_dim=12, attention_bias=True,
                                                 tie_word_embeddings=False)),
    },
    "gemma2": {
        "base": (T.Gemma2Config, dict(_GEMMA_LIKE, sliding_window=5, layer_types=_GEMMA_TYPES, query_pre_attn_scalar=20,
                                      attn_logit_softcapping=30.0, final_logit_softcapping=4.0,
                                      rope_parameters={"rope_type": "default", "rope_theta": 700.0})),
    },
    "gemma3": {
        "base": (T.Gemma3TextConfig, dict(_GEMMA_LIKE, sliding_window=5, layer_types=_GEMMA_TYPES, query_pre_attn_scalar=20,
                                          rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5000.0},
                                                           "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
        "capped_mha_untied": (T.Gemma3TextConfig, dict(_GEMMA_LIKE, num_key_value_heads=4, sliding_window=4, layer_types=_GEMMA_TYPES,
                                                       final_logit_softcapping=4.0, tie_word_embeddings=False,
                                                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 3000.0},
                                                                        "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    },
    "phi": {
        "base": (T.PhiConfig, dict(_LLAMA_LIKE, num_attention_heads=4,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})),
        "gqa_qk_layernorm_tied": (T.PhiConfig, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, qk_layernorm=True,
                                                    tie_word_embeddings=True, rope_parameters={
                                                        "rope_type": "default", "rope_theta": 800.0, "partial_rotary_factor": 0.75})),
    },
    "phi3": {
        "base": (T.Phi3Config, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, sliding_window=5, pad_token_id=0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 600.0, "partial_rotary_factor": 0.75})),
        "mha_tied": (T.Phi3Config, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                                        pad_token_id=0)),
    },
    "olmo": {
        "base": (T.OlmoConfig, dict(_LLAMA_LIKE, num_attention_heads=4, clip_qkv=1.5, pad_token_id=0,
                                    rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
        "gqa_bias_tied": (T.OlmoConfig, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, attention_bias=True,
                                             tie_word_embeddings=True, pad_token_id=0)),
    },
    "olmo2": {
        "base": (T.Olmo2Config, dict(_LLAMA_LIKE, num_attention_heads=4, rms_norm_eps=1e-6, pad_token_id=0,
                                     rope_parameters={"rope_type": "default", "rope_theta": 700.0})),
        "gqa_tied": (T.Olmo2Config, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                                         pad_token_id=0)),
    },
    # GPT-Neo: unscaled attention, local (window 4) and global layers; intermediate_size None: 4 * d_model
    "gpt_neo": {
        "base": (T.GPTNeoConfig, dict(vocab_size=VOCAB, hidden_size=48, num_layers=3, num_heads=4, max_position_embeddings=64,
                                      attention_types=[[["local", "global"], 1], [["local"], 1]], window_size=4,
                                      intermediate_size=80)),
        "global_untied": (T.GPTNeoConfig, dict(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=3, max_position_embeddings=64,
                                               attention_types=[[["global"], 2]], tie_word_embeddings=False,
                                               activation_function="gelu")),
    },
    # OPT: ReLU, positions offset by 2; OPT-350m's post-LN blocks with project_in/project_out and no
    # final norm; projections before a final norm, no biases, weightless norms (TL 3.9 runs only "base")
    "opt": {
        "base": (T.OPTConfig, dict(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=3, num_attention_heads=4,
                                   max_position_embeddings=64)),
        "post_ln_project": (T.OPTConfig, dict(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=3,
                                              num_attention_heads=3, max_position_embeddings=64, do_layer_norm_before=False,
                                              word_embed_proj_dim=32)),
        "project_unbiased_weightless_untied": (T.OPTConfig, dict(vocab_size=VOCAB, hidden_size=48, ffn_dim=80, num_hidden_layers=2,
                                                                 num_attention_heads=4, max_position_embeddings=64, enable_bias=False,
                                                                 word_embed_proj_dim=24, layer_norm_elementwise_affine=False,
                                                                 tie_word_embeddings=False, activation_function="gelu")),
    },
    # BLOOM: ALiBi (4 heads: TL 3.9's slopes are HF's only for a power of two), the embedding LayerNorm;
    # 6 heads (HF's slopes for the two interleaved sequences) with the residual from the norm's output
    "bloom": {
        "base": (T.BloomConfig, dict(vocab_size=VOCAB, hidden_size=48, n_layer=3, n_head=4)),
        "residual_post_ln_six_heads_untied": (T.BloomConfig, dict(vocab_size=VOCAB, hidden_size=48, n_layer=3, n_head=6,
                                                                  apply_residual_connection_post_layernorm=True,
                                                                  tie_word_embeddings=False, layer_norm_epsilon=1e-3)),
    },
    # Mixtral: routers scaled (perturb_family_) so the top-2 of 4 experts differ by token
    "mixtral": {
        "base": (T.MixtralConfig, dict(_LLAMA_LIKE, num_attention_heads=6, num_key_value_heads=2, sliding_window=5,
                                       num_local_experts=4, num_experts_per_tok=2,
                                       rope_parameters={"rope_type": "default", "rope_theta": 600.0})),
        "top1_no_window_tied": (T.MixtralConfig, dict(_LLAMA_LIKE, num_attention_heads=4, num_key_value_heads=4, num_local_experts=3,
                                                      num_experts_per_tok=1, tie_word_embeddings=True)),
    },
}  # fmt: skip
FAMILIES = list(VARIANTS)
ALL_VARIANTS = [(family, variant) for family, variants in VARIANTS.items() for variant in variants]


def family_config(family: str, variant: str = "base", **overrides):
    cls, fields = VARIANTS[family][variant]
    fields = {**fields, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    if "rope_parameters" in fields:  # HF edits it in place
        fields["rope_parameters"] = {k: dict(v) if isinstance(v, dict) else v for k, v in fields["rope_parameters"].items()}
    if "layer_types" in fields:
        fields["layer_types"] = list(fields["layer_types"])
    return cls(**fields)


def supports(model, attn: str) -> bool:
    return attn == "eager" or bool(getattr(type(model), "_supports_sdpa", False))


def _is_query_or_key(name: str) -> bool:
    return name.endswith(("q_proj.weight", "k_proj.weight"))


@torch.no_grad()
def perturb_family_(model, seed: int = 0, qk_scale: float = 8.0):
    """Move norm weights and biases away from their init (1 and 0; Gemma's 1 + w from 1) and
    scale the query and key projections (NeoX: the q and k rows of each head's fused block;
    Qwen3, Gemma 3: their q/k norms, which undo a projection scale), so that a wrong rotary base,
    pairing, dimension, norm or mask reaches the logits."""
    gen = torch.Generator().manual_seed(seed)
    plus_one = model.config.model_type.startswith("gemma")  # norms scale by 1 + w
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen).to(param.dtype)
        if name.endswith(".bias") or param.dim() == 1:
            param.add_(0.1 * noise)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            param.copy_((1 + param) * qk_scale**0.5 - 1 if plus_one else param * qk_scale**0.5)
        elif name.endswith(("q_layernorm.weight", "k_layernorm.weight", "q_layernorm.bias", "k_layernorm.bias")):
            param.mul_(qk_scale**0.5)  # Phi's per-head LayerNorms
        elif name.endswith("qkv_proj.weight"):  # Phi-3: rows [q heads | k heads | v heads]
            c = model.config
            d_head = c.hidden_size // c.num_attention_heads
            param[: (c.num_attention_heads + c.num_key_value_heads) * d_head].mul_(qk_scale)
        elif _is_query_or_key(name):
            param.mul_(qk_scale)
        elif name.endswith("mlp.gate.weight"):  # Mixtral's router: decisive, token-dependent routing
            param.mul_(10.0)
        elif name.endswith("query_key_value.weight"):
            n = model.config.num_attention_heads
            param.view(n, 3, -1, param.shape[-1])[:, :2].mul_(qk_scale)
    return model


def make_family(family: str, variant: str = "base", seed: int = 0, attn: str = "sdpa", qk_scale: float = 8.0, **overrides):
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(family_config(family, variant, **overrides)).eval()
    if supports(model, attn):
        model.set_attn_implementation(attn)
    return perturb_family_(model, seed, qk_scale)


def float64_logits(model, tokens, attention_mask=None):
    """The HF model's logits in float64 (tolerance.float64_copy: the model is left as it is)."""
    with torch.no_grad():
        return float64_copy(model)(tokens, attention_mask=attention_mask).logits


def assert_equal_or_rounded(actual, expected, rounded=()) -> None:
    """actual[key] == expected[key] bitwise for every key, except those in ``rounded`` (behind a
    family's tl_rounded_keys: Gemma's scaled embedding and w + 1 norms), which must agree within
    the rounding of that arithmetic, 2 eps (|value| + 1)."""
    assert list(actual) == list(expected)
    for key, value in expected.items():
        if key in rounded:
            assert ((actual[key].double() - value.double()).abs() <= 2 * eps(value.dtype) * (value.double().abs() + 1)).all(), key
        else:
            assert torch.equal(actual[key], value), key


def rounded_leaves(cfg, extras=()) -> set:
    """HF leaves computed from a family's rounded TL keys (see assert_equal_or_rounded)."""
    from functional_bridge.architectures import family_for
    from functional_bridge.tl_layout import hf_dependencies

    rounded = family_for(cfg).tl_rounded_keys(cfg)
    return {leaf for leaf, keys in hf_dependencies(cfg, tuple(extras)).items() if keys & rounded}
