"""Gemma 1, 2 and 3 (text): GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM.

The Llama layout (decoder.py) with Gemma's differences as data: RMSNorms that scale by (1 + w)
in float32; token embeddings times sqrt(d_model) in the model dtype (HF's non-persistent
``embed_scale`` buffer, derived here from the config); GeGLU. Gemma 2 and 3 add norms on the
attention and MLP outputs (TL's ``ln1_post``/``ln2_post``; their pre-MLP norm is
``pre_feedforward_layernorm``), alternating sliding windows (``layer_types``), the attention scale
sqrt(query_pre_attn_scalar) and final-logit soft-capping. Gemma 2 soft-caps the attention scores
too; Gemma 3's config has the field but HF's Gemma3Attention never applies it, so neither does
this bridge. Gemma 3 adds per-head q/k norms and its own rotary settings per layer type (local
layers: their own base, unscaled; global layers: a base and "linear" or "llama3" scaling).

Refused by name: ``use_bidirectional_attention`` (an encoder setting, for embedding models).
"""

from __future__ import annotations

import math

from ..components.mlp import ACTIVATIONS
from ..config import BridgeConfig
from .decoder import Layout, NormSlot, decoder_family
from .llama import layer_type_windows
from .rope import rope_fields

GEMMA1 = Layout(plus_one=True, embed_scale=True)
GEMMA2 = Layout(
    norms=(
        NormSlot("ln1", "input_layernorm", "ln1"),
        NormSlot("ln1_post", "post_attention_layernorm", "ln1_post"),
        NormSlot("ln2", "pre_feedforward_layernorm", "ln2"),
        NormSlot("ln2_post", "post_feedforward_layernorm", "ln2_post"),
    ),
    plus_one=True,
    embed_scale=True,
)


class _RopeView:
    """One layer type's rope settings as a config object, for rope_fields."""

    def __init__(self, hf, parameters: dict):
        self.rope_parameters = parameters
        self.max_position_embeddings = hf.max_position_embeddings


def _gemma3_rope(hf, arch: str, d_head: int) -> dict:
    """Gemma 3's per-layer-type rope: global layers as rope_fields reads them, local layers a
    base of their own (anything but plain rope there is refused)."""
    params = hf.rope_parameters
    if not isinstance(params, dict) or "full_attention" not in params:
        return rope_fields(hf, arch, d_head, partial_rotary=False)
    fields = rope_fields(_RopeView(hf, dict(params["full_attention"])), arch, d_head, partial_rotary=False)
    local = params.get("sliding_attention") or {"rope_type": "default", "rope_theta": fields["rotary_base"]}
    if local.get("rope_type", "default") != "default" or local.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{arch} sliding_attention rope {local} is not supported (only plain rope on local layers)")
    return {**fields, "rotary_base_local": float(local["rope_theta"])}


def _config_from_hf(hf, arch: str, generation: int) -> BridgeConfig:
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError(f"{arch} with use_bidirectional_attention=True (an encoder) is not supported")
    act = hf.hidden_act if generation == 1 else hf.hidden_activation
    if act not in ACTIVATIONS:
        raise ValueError(f"{arch} hidden activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    d_head = hf.head_dim
    window, attn_types = (None, None) if generation == 1 else layer_type_windows(hf.sliding_window, hf.layer_types)
    attn_cap = getattr(hf, "attn_logit_softcapping", None) if generation == 2 else None
    bias = bool(getattr(hf, "attention_bias", False))
    rope = rope_fields(hf, arch, d_head, partial_rotary=False) if generation < 3 else _gemma3_rope(hf, arch, d_head)
    return BridgeConfig(
        original_architecture=arch,
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        n_key_value_heads=hf.num_key_value_heads,  # TL's Gemma conversion always groups K/V (_W_K)
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=act,
        normalization_type="RMS",
        eps=hf.rms_norm_eps,
        attn_scale=math.sqrt(d_head if generation == 1 else hf.query_pre_attn_scalar),
        gated_mlp=True,
        use_qk_norm=generation == 3,
        qkv_bias=bias,
        attn_out_bias=bias,
        window_size=window,
        attn_types=attn_types,
        attn_scores_soft_cap=attn_cap,
        output_logits_soft_cap=getattr(hf, "final_logit_softcapping", None) if generation > 1 else None,
        norm_placement="pre" if generation == 1 else "pre_post",
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        **rope,
    )


GEMMA = decoder_family("gemma", "GemmaForCausalLM", lambda hf: _config_from_hf(hf, "GemmaForCausalLM", 1), GEMMA1)
GEMMA_2 = decoder_family("gemma2", "Gemma2ForCausalLM", lambda hf: _config_from_hf(hf, "Gemma2ForCausalLM", 2), GEMMA2)
GEMMA_3 = decoder_family("gemma3_text", "Gemma3ForCausalLM", lambda hf: _config_from_hf(hf, "Gemma3ForCausalLM", 3), GEMMA2)
