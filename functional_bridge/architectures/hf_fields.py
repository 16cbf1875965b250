"""The BridgeConfig fields that HF configs with Llama's attribute names (num_hidden_layers,
hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, hidden_act,
max_position_embeddings) give the same way in every family that has them: Llama, Mistral,
Qwen2/3, Mixtral, Phi, Phi-3, OLMo, OLMo 2. A family adds what it alone decides."""

from __future__ import annotations

import math

from ..components.mlp import ACTIVATIONS


def dimension_fields(hf, arch: str, *, d_head: int | None = None, keep_kv_heads: bool = False) -> dict:
    """The shared fields as BridgeConfig keywords; d_head defaults to HF's head_dim (or
    hidden_size // num_attention_heads). n_key_value_heads is None when it equals n_heads, as TL's
    converters set it, unless keep_kv_heads. Refuses an activation the MLP cannot apply."""
    if hf.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{arch} hidden_act {hf.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    n_heads = hf.num_attention_heads
    d_head = d_head or getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    return dict(
        original_architecture=arch,
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=n_heads,
        d_head=d_head,
        n_key_value_heads=n_kv if keep_kv_heads or n_kv != n_heads else None,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.hidden_act,
        attn_scale=math.sqrt(d_head),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )
