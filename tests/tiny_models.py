"""Tiny perturbed HF models for every family the bridge registers, so that family-generic tests
(processing, TL edits) cover each family as it lands."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import functional_bridge as fb
from functional_bridge.architectures import family_for_architecture
from functional_bridge.architectures.family import CAUSAL_LM
from helpers import make_gpt2

SMALL = dict(vocab_size=97, max_position_embeddings=40)
LLAMA_LIKE = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, **SMALL)

GEMMA_LIKE = dict(LLAMA_LIKE, hidden_size=64, num_key_value_heads=2, head_dim=12)
GEMMA_TYPES = ("sliding_attention", "full_attention")

# HF class name -> HF config class name and fields (d_model 48, 4 heads, d_mlp 80 != d_model).
CONFIGS = {
    "LlamaForCausalLM": ("LlamaConfig", dict(LLAMA_LIKE, num_key_value_heads=2)),
    "MistralForCausalLM": ("MistralConfig", dict(LLAMA_LIKE, num_key_value_heads=2, sliding_window=None)),
    "Qwen2ForCausalLM": ("Qwen2Config", dict(LLAMA_LIKE, num_key_value_heads=2)),
    "Qwen3ForCausalLM": ("Qwen3Config", dict(LLAMA_LIKE, num_key_value_heads=2, head_dim=12)),
    "GPTNeoXForCausalLM": (
        "GPTNeoXConfig",
        dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, **SMALL,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ),
    "GPTJForCausalLM": ("GPTJConfig", dict(n_embd=48, n_inner=80, n_layer=2, n_head=4, rotary_dim=6, vocab_size=97, n_positions=40, bos_token_id=0, eos_token_id=0)),
    "BertForMaskedLM": ("BertConfig", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, **SMALL)),
    "BertForPreTraining": ("BertConfig", dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, **SMALL)),
    "PhiForCausalLM": ("PhiConfig", dict(LLAMA_LIKE)),  # TL's Phi conversion has no grouped K/V
    "Phi3ForCausalLM": ("Phi3Config", dict(LLAMA_LIKE, num_key_value_heads=2, pad_token_id=0,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5})),
    "OlmoForCausalLM": ("OlmoConfig", dict(LLAMA_LIKE, clip_qkv=2.0, pad_token_id=0)),  # TL's OLMo conversion: no grouped K/V
    "Olmo2ForCausalLM": ("Olmo2Config", dict(LLAMA_LIKE, pad_token_id=0)),
    "MixtralForCausalLM": ("MixtralConfig", dict(LLAMA_LIKE, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2)),
    "GPTNeoForCausalLM": ("GPTNeoConfig", dict(hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, **SMALL,
                                               attention_types=[[["global", "local"], 1]], window_size=4)),
    "OPTForCausalLM": ("OPTConfig", dict(hidden_size=48, ffn_dim=80, num_hidden_layers=2, num_attention_heads=4, **SMALL)),
    "BloomForCausalLM": ("BloomConfig", dict(hidden_size=48, n_layer=2, n_head=4, vocab_size=97)),
    # Gemma: d_model 64 (sqrt(d_model) exact in every dtype), one local and one global layer
    "GemmaForCausalLM": ("GemmaConfig", dict(GEMMA_LIKE)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(GEMMA_LIKE, sliding_window=4, layer_types=GEMMA_TYPES, query_pre_attn_scalar=16,
                                               attn_logit_softcapping=20.0, final_logit_softcapping=5.0)),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(GEMMA_LIKE, sliding_window=4, layer_types=GEMMA_TYPES, query_pre_attn_scalar=16,
                                                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


def architectures() -> list[str]:
    return fb.supported_architectures()


def causal_lm_architectures() -> list[str]:
    """The registered causal LMs: what weight processing, an untied head and the pre-LN residual
    decompositions apply to (encoders refuse them by name: tests/test_bert.py)."""
    return [arch for arch in architectures() if family_for_architecture(arch).kind == CAUSAL_LM]


def tiny_model(architecture: str, seed: int = 0, tie_word_embeddings: bool | None = None) -> torch.nn.Module:
    """A small eval-mode model of this HF class with norms and biases moved off their init."""
    tie = {} if tie_word_embeddings is None else {"tie_word_embeddings": tie_word_embeddings}
    if architecture == "GPT2LMHeadModel":
        return make_gpt2(seed, **tie)
    if architecture not in CONFIGS:
        pytest.fail(f"no tiny config for {architecture}: add one to tests/tiny_models.py")
    config_class, fields = CONFIGS[architecture]
    fields = {k: list(v) if isinstance(v, tuple) else copy.deepcopy(v) for k, v in fields.items()}  # HF edits in place
    config = getattr(transformers, config_class)(**fields, **tie)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.add_(0.1 * noise if param.dim() == 1 else 0.5 * param.std() * noise)
    return model
