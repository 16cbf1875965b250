"""Phi-3 (Phi3ForCausalLM): the Llama layout (decoder.py) with fused projections.

``self_attn.qkv_proj`` is one nn.Linear whose rows are [q heads | k heads | v heads] (registered
after ``o_proj``), ``mlp.gate_up_proj`` one whose rows are [gate | up]; TL's W_Q/W_K/W_V and
W_gate/W_in are views of them, and the forward runs each as one matmul. Partial rotary
(Phi-4-mini's partial_rotary_factor 0.75) and a sliding window on every layer are implemented.

Refused by name: rope_type "longrope" (Phi-3-128k, Phi-3.5, Phi-4-mini): HF picks its short or
long factors from the longest position in the batch, so a row's logits would depend on the
other rows.
"""

from __future__ import annotations

from ..config import BridgeConfig
from .decoder import Layout, decoder_family
from .hf_fields import dimension_fields
from .rope import rope_fields

ARCHITECTURE = "Phi3ForCausalLM"


def config_from_hf(hf) -> BridgeConfig:
    dims = dimension_fields(hf, ARCHITECTURE)  # n_key_value_heads as TL's Phi-3 mapping
    window = getattr(hf, "sliding_window", None)
    return BridgeConfig(
        **dims,
        normalization_type="RMS",
        eps=hf.rms_norm_eps,
        gated_mlp=True,
        qkv_bias=False,
        attn_out_bias=False,
        window_size=window,
        **rope_fields(hf, ARCHITECTURE, dims["d_head"], partial_rotary=True),
    )


FAMILY = decoder_family("phi3", ARCHITECTURE, config_from_hf, Layout(fused=True))
