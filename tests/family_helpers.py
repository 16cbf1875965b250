"""Small random rotary-family models (Llama, Mistral, Qwen2, Qwen3, GPT-NeoX, GPT-J) chosen to
break lazy code: grouped-query attention, head_dim != d_model / n_heads, odd layer counts,
partial rotary other than the default fraction, sliding windows shorter than the test
sequences, non-default rotary bases, and weights perturbed so a wrong setting reaches the logits."""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 97
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=3, max_position_embeddings=64)

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
}  # fmt: skip
FAMILIES = list(VARIANTS)
ALL_VARIANTS = [(family, variant) for family, variants in VARIANTS.items() for variant in variants]


def family_config(family: str, variant: str = "base", **overrides):
    cls, fields = VARIANTS[family][variant]
    fields = {**fields, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    if "rope_parameters" in fields:
        fields["rope_parameters"] = dict(fields["rope_parameters"])  # HF edits it in place
    return cls(**fields)


def supports(model, attn: str) -> bool:
    return attn == "eager" or bool(getattr(type(model), "_supports_sdpa", False))


def _is_query_or_key(name: str) -> bool:
    return name.endswith(("q_proj.weight", "k_proj.weight"))


@torch.no_grad()
def perturb_family_(model, seed: int = 0, qk_scale: float = 8.0):
    """Move norm weights and biases away from their init (1 and 0) and scale the query and key
    projections (NeoX: the q and k rows of each head's fused block; Qwen3: its q/k norms, which
    undo a projection scale), so that a wrong rotary base, pairing, dimension, norm or mask
    reaches the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen).to(param.dtype)
        if name.endswith(".bias") or param.dim() == 1:
            param.add_(0.1 * noise)
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            param.mul_(qk_scale**0.5)
        elif _is_query_or_key(name):
            param.mul_(qk_scale)
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
