"""LayerNorm and RMSNorm with TransformerLens's hook points (hook_scale, hook_normalized).

hook_scale is [batch, pos, 1]; hook_normalized is the normalised input before the affine
weights, as TransformerLens caches it. Without a hook on the scale, the norm runs as one fused
kernel; with one, it is computed explicitly in float32 so an edited scale takes effect.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hooks import HookSet
from .precision import upcast


class Norm(NamedTuple):
    w: Tensor  # [d]
    b: Tensor | None  # [d]; None for RMSNorm
    kind: str  # "LN" or "RMS"


def _explicit_scale(x32: Tensor, kind: str, eps: float) -> tuple[Tensor, Tensor]:
    """(centred input, scale) in float32; scale is [..., 1]."""
    if kind == "LN":
        x32 = x32 - x32.mean(-1, keepdim=True)
    return x32, (x32.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def apply_norm(
    x: Tensor, norm: Norm, eps: float, hooks: HookSet, scale_name: str, normalized_name: str
) -> Tensor:
    """x: [..., d] -> [..., d], normalised then scaled by w (and shifted by b)."""
    if hooks.wants(scale_name):
        centred, scale = _explicit_scale(upcast(x), norm.kind, eps)
        scale = hooks(scale_name, scale)
        normalized = hooks(normalized_name, (centred / scale).to(x.dtype))
        return _affine(normalized, norm)
    if norm.kind == "LN":
        if not hooks.wants(normalized_name):
            return F.layer_norm(x, x.shape[-1:], norm.w, norm.b, eps)
        normalized = F.layer_norm(x, x.shape[-1:], None, None, eps)
    else:
        normalized = rms_normalize(x, eps)
    return _affine(hooks(normalized_name, normalized), norm)


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps), computed in float32 and cast back, as HF's RMSNorms do."""
    x32 = upcast(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _affine(normalized: Tensor, norm: Norm) -> Tensor:
    out = normalized * norm.w
    return out if norm.b is None else out + norm.b
