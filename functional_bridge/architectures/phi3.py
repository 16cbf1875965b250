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

import math

from ..components.mlp import ACTIVATIONS
from ..config import BridgeConfig
from .decoder import Layout, decoder_family
from .rope import rope_fields

ARCHITECTURE = "Phi3ForCausalLM"


def config_from_hf(hf) -> BridgeConfig:
    if hf.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{ARCHITECTURE} hidden_act {hf.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    n_heads = hf.num_attention_heads
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    window = getattr(hf, "sliding_window", None)
    return BridgeConfig(
        original_architecture=ARCHITECTURE,
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=n_heads,
        d_head=d_head,
        n_key_value_heads=n_kv if n_kv != n_heads else None,  # as TL's Phi-3 mapping
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.hidden_act,
        normalization_type="RMS",
        eps=hf.rms_norm_eps,
        attn_scale=math.sqrt(d_head),
        gated_mlp=True,
        qkv_bias=False,
        attn_out_bias=False,
        window_size=window,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **rope_fields(hf, ARCHITECTURE, d_head, partial_rotary=True),
    )


FAMILY = decoder_family("phi3", ARCHITECTURE, config_from_hf, Layout(fused=True))
