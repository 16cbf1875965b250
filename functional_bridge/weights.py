"""TransformerLens-format weights, derived on demand from the HF leaves.

Nothing here is stored: every call recomputes views of the current leaves, so the TL view can
never be stale after an optimizer step, a load_state_dict, a to() or an edit.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .architectures import family_for
from .architectures.family import GLOBAL_TL_KEYS
from .config import BridgeConfig
from .derived import guard_unstored
from .params import Params, check_params, refuse_sharded

# HookedTransformer's stacked properties: short name -> per-layer TL key suffix.
LAYER_WEIGHTS = {
    "W_Q": "attn.W_Q", "W_K": "attn.W_K", "W_V": "attn.W_V", "W_O": "attn.W_O",
    "b_Q": "attn.b_Q", "b_K": "attn.b_K", "b_V": "attn.b_V", "b_O": "attn.b_O",
    "W_in": "mlp.W_in", "b_in": "mlp.b_in", "W_gate": "mlp.W_gate",
    "W_out": "mlp.W_out", "b_out": "mlp.b_out",
}  # fmt: skip
# Weights outside the blocks: short name -> TL key (a family may name them otherwise: global_tl_keys).
GLOBAL_WEIGHTS = GLOBAL_TL_KEYS


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL name -> tensor: the keys, shapes and values of TransformerLens 3.9's conversion for the
    family, as differentiable views of the leaves (no copies where a view exists). Refuses FSDP2
    shards by name (a sharded bridge's tl_parameters(), W_Q...): they are not whole leaves."""
    check_params(params, cfg)
    refuse_sharded(params, "the TransformerLens weights (tl_parameters(), W_Q...)")
    tl = family_for(cfg).tl_weights(params, cfg)
    return guard_unstored(tl, params, lambda key: _unstored_reason(params, cfg, key))


def _unstored_reason(params: Params, cfg: BridgeConfig, key: str) -> str:
    """Why TL key ``key`` is not a view of a leaf, in words, for DerivedTensor's error."""
    from .editing import present_extras
    from .tl_layout import tl_layout

    layout = tl_layout(cfg, present_extras(params, cfg))
    if key in layout.derived:
        return f"it is a copy of {layout.derived[key]} (expanded or transposed)"
    if key not in layout.backed:
        return f"{cfg.original_architecture}'s HF layout has no slot for it (TransformerLens's value is a constant)"
    return "it is computed from the leaves, not stored in one"


def stacked_tl_weight(params: Params, cfg: BridgeConfig, short_name: str) -> Tensor:
    """HookedTransformer's model.W_Q etc.: per-layer weights stacked on a leading [n_layers]
    axis, or a global weight (W_E, W_pos, W_U, b_U)."""
    tl = tl_weights(params, cfg)
    if short_name in GLOBAL_WEIGHTS:
        key = family_for(cfg).global_tl_keys[short_name]
        if key == "unembed.b_U" and key not in tl:  # HookedTransformer has one for every model: zeros
            return tl["unembed.W_U"].new_zeros(cfg.d_vocab_out)
        if key not in tl:
            raise KeyError(f"this {cfg.original_architecture} model has no {key} ({short_name})")
        return tl[key]
    if short_name not in LAYER_WEIGHTS:
        raise KeyError(f"unknown TransformerLens weight {short_name!r}; known: {sorted(LAYER_WEIGHTS) + sorted(GLOBAL_WEIGHTS)}")
    keys = [f"blocks.{layer}.{LAYER_WEIGHTS[short_name]}" for layer in range(cfg.n_layers)]
    if keys[0] not in tl:
        raise KeyError(f"this {cfg.original_architecture} model has no {LAYER_WEIGHTS[short_name]} ({short_name})")
    with torch._C.DisableTorchFunctionSubclass():
        stacked = torch.stack([tl[key] for key in keys])
    reason = "it stacks the layers' weights into a new tensor"
    return guard_unstored({short_name: stacked}, params, lambda key: reason)[short_name]
