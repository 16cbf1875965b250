"""Rotary position embeddings, computed once per forward from the position ids (no buffers).

Numerics follow HF: inverse frequencies and angles in float32 (float64 for float64
activations: never downcast), cos/sin cast to the activation dtype, then
``x * cos + rotate(x) * sin`` in that dtype. Two pairings: half-split (NeoX, Llama:
dim i turns with dim i + rotary_dim/2) and adjacent pairs (GPT-J: dims 2i and 2i+1). Only the
first ``rotary_dim`` dims of each head turn; the rest pass through.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..config import BridgeConfig


class Rotary(NamedTuple):
    cos: Tensor  # [batch or 1, pos, 1, rotary_dim], activation dtype
    sin: Tensor  # [batch or 1, pos, 1, rotary_dim]
    adjacent_pairs: bool


def inverse_frequencies(
    cfg: BridgeConfig, device: torch.device, dtype: torch.dtype = torch.float32, local: bool = False
) -> Tensor:
    """[rotary_dim // 2] angular frequencies, with HF's "linear" or "llama3" scaling; local: those
    of the windowed layers of a model with a local base (Gemma 3), which are never scaled."""
    dim = cfg.rotary_dim
    base = cfg.rotary_base_local if local else cfg.rotary_base
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype) / dim))
    if local:
        return inv_freq
    if cfg.use_NTK_by_parts_rope:  # HF's _compute_llama3_parameters, op for op
        factor, old_len = cfg.NTK_by_parts_factor, cfg.NTK_original_ctx_len
        low, high = cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    if cfg.rotary_scaling_factor != 1.0:
        inv_freq = inv_freq / cfg.rotary_scaling_factor
    return inv_freq


def rotary_tables(positions: Tensor, cfg: BridgeConfig, dtype: torch.dtype, local: bool = False) -> Rotary:
    """positions: [batch or 1, pos] integer ids -> cos/sin tables for the layers of one forward
    (local: for the layers that use rotary_base_local)."""
    precision = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = inverse_frequencies(cfg, positions.device, precision, local)
    angles = positions[..., None].to(precision) * inv_freq  # [batch or 1, pos, rotary_dim // 2]
    if cfg.rotary_adjacent_pairs:
        angles = angles.repeat_interleave(2, dim=-1)
    else:
        angles = torch.cat((angles, angles), dim=-1)  # [batch or 1, pos, rotary_dim]
    return Rotary(angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None], cfg.rotary_adjacent_pairs)


def _rotate(x: Tensor, adjacent_pairs: bool) -> Tensor:
    if adjacent_pairs:  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # (a, b) -> (-b, a)
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, rotary: Rotary) -> Tensor:
    """x: [batch, pos, head, d_head] -> the same, first rotary_dim dims of each head rotated (in
    the tables' dtype when it is wider, e.g. float32 tables for OLMo, then cast back)."""
    rotary_dim = rotary.cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return (x * rotary.cos + _rotate(x, rotary.adjacent_pairs) * rotary.sin).to(x.dtype)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = x_rot * rotary.cos + _rotate(x_rot, rotary.adjacent_pairs) * rotary.sin
    return torch.cat((rotated.to(x.dtype), x_pass), dim=-1)
