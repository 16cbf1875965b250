"""The anchor: TransformerLens 3.9's HookedTransformer built from the same HF weights.

No hub: the config is written from the HF config and the weights go through TransformerLens's
own GPT-2 conversion, with no processing (no LayerNorm folding, no centring), so it computes
the same function as the HF model and the bridge.
"""

from __future__ import annotations

import torch


def tl_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("transformer-lens")
    except Exception:
        return None


def tl_config(hf):
    import transformer_lens

    c = hf.config
    param = next(hf.parameters())
    return transformer_lens.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        use_attn_scale=c.scale_attn_weights, scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
        dtype=param.dtype, device=str(param.device), init_weights=False,
    )  # fmt: skip


def hooked_transformer(hf, cls=None):
    """HookedTransformer (or cls, a subclass: SAELens's HookedSAETransformer) with hf's weights
    (TransformerLens's conversion, no processing)."""
    import transformer_lens
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    cfg = tl_config(hf)
    model = (cls or transformer_lens.HookedTransformer)(cfg)
    with torch.no_grad():
        state = dict(convert_gpt2_weights(hf, cfg))  # TL pops keys from the dict it is given
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()
