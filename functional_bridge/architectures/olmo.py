"""OLMo and OLMo 2 (OlmoForCausalLM, Olmo2ForCausalLM): the Llama layout (decoder.py).

OLMo's LayerNorms have no parameters (F.layer_norm in float32, eps 1e-5 whatever the config);
TL's view gives them w = 1, b = 0 as TL's converter does. ``clip_qkv`` clamps queries, keys and
values after their projections (and their hooks, as TransformerLens). OLMo 2 has no norms on
the sublayer inputs: RMSNorms on the attention and MLP outputs, which TransformerLens names ln1
and ln2 (its post-norm architectures), and q/k RMSNorms over all heads' dims at once, before the
head split; its RMSNorms apply their weights in float32 before the cast back. Both rotate
queries and keys in float32 (HF keeps OLMo's cos/sin tables in float32).
"""

from __future__ import annotations

from ..config import BridgeConfig
from .decoder import Layout, NormSlot, decoder_family
from .hf_fields import dimension_fields
from .rope import rope_fields

OLMO_LAYOUT = Layout(norms=(NormSlot("ln1", None, "ln1"), NormSlot("ln2", None, "ln2")), norm_kind="LN")
OLMO2_LAYOUT = Layout(
    norms=(NormSlot("ln1", "post_attention_layernorm", "ln1_post"), NormSlot("ln2", "post_feedforward_layernorm", "ln2_post")),
    float32_weight=True,
)


def _config_from_hf(hf, arch: str, olmo2: bool) -> BridgeConfig:
    dims = dimension_fields(hf, arch, d_head=hf.hidden_size // hf.num_attention_heads)
    bias = bool(getattr(hf, "attention_bias", False))
    return BridgeConfig(
        **dims,
        normalization_type="RMS" if olmo2 else "LN",
        eps=hf.rms_norm_eps if olmo2 else 1e-5,  # OlmoLayerNorm's eps is fixed
        gated_mlp=True,
        qkv_bias=bias,
        attn_out_bias=bias,
        use_qk_norm=olmo2,
        qk_norm_over_heads=olmo2,
        norm_placement="output" if olmo2 else "pre",
        clip_qkv=None if olmo2 else getattr(hf, "clip_qkv", None),
        rotary_in_float32=True,  # HF's OLMo rotary keeps cos/sin in float32
        **rope_fields(hf, arch, dims["d_head"], partial_rotary=False),
    )


OLMO = decoder_family("olmo", "OlmoForCausalLM", lambda hf: _config_from_hf(hf, "OlmoForCausalLM", False), OLMO_LAYOUT)
OLMO_2 = decoder_family("olmo2", "Olmo2ForCausalLM", lambda hf: _config_from_hf(hf, "Olmo2ForCausalLM", True), OLMO2_LAYOUT)
