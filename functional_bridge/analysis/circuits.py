"""Per-head QK and OV circuits as FactoredMatrix, stacked [n_layers, n_heads], from tl_weights.

W_QK = W_Q W_K^T and W_OV = W_V W_O, each [d_model, d_model] per head, kept factored (the
Mathematical Framework's circuits; HookedTransformer's ``model.QK`` and ``model.OV``). Grouped-
query models give every query head its key/value head's weights, as HookedTransformer's W_K and
W_V do.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..config import BridgeConfig
from ..params import Params
from ..weights import tl_weights
from .factored_matrix import FactoredMatrix


def head_weight(tl: Mapping[str, Tensor], cfg: BridgeConfig, layer: int, name: str) -> Tensor:
    """blocks.{layer}.attn.{name} with one slice per query head: [n_heads, ...]. A grouped-query
    key/value weight stored once per key/value head (TL's ``_W_K``) is repeated per query head."""
    key = f"blocks.{layer}.attn.{name}"
    if key in tl:
        return tl[key]
    grouped = f"blocks.{layer}.attn._{name}"
    if grouped in tl:  # [n_kv_heads, ...]
        return tl[grouped].repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=0)
    raise KeyError(f"this {cfg.original_architecture} model has no {key}")


def stacked_head_weight(tl: Mapping[str, Tensor], cfg: BridgeConfig, name: str) -> Tensor:
    """[n_layers, n_heads, ...]: head_weight for every layer."""
    return torch.stack([head_weight(tl, cfg, layer, name) for layer in range(cfg.n_layers)])


def qk_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig) -> FactoredMatrix:
    W_Q = stacked_head_weight(tl, cfg, "W_Q")  # [n_layers, n_heads, d_model, d_head]
    W_K = stacked_head_weight(tl, cfg, "W_K")  # [n_layers, n_heads, d_model, d_head]
    return FactoredMatrix(W_Q, W_K.mT)


def ov_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig) -> FactoredMatrix:
    W_V = stacked_head_weight(tl, cfg, "W_V")  # [n_layers, n_heads, d_model, d_head]
    W_O = stacked_head_weight(tl, cfg, "W_O")  # [n_layers, n_heads, d_head, d_model]
    return FactoredMatrix(W_V, W_O)


def qk_circuit(params: Params, cfg: BridgeConfig) -> FactoredMatrix:
    """W_Q W_K^T per head: FactoredMatrix [n_layers, n_heads, d_model, d_model]
    (query-side residual on the left, key-side on the right)."""
    return qk_from_tl(tl_weights(params, cfg), cfg)


def ov_circuit(params: Params, cfg: BridgeConfig) -> FactoredMatrix:
    """W_V W_O per head: FactoredMatrix [n_layers, n_heads, d_model, d_model]
    (residual read on the left, residual written on the right)."""
    return ov_from_tl(tl_weights(params, cfg), cfg)
