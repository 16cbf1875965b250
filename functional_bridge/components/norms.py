"""LayerNorm and RMSNorm with TransformerLens's hook points (hook_scale, hook_normalized).

hook_scale is [batch, pos, 1]; hook_normalized is the normalised input before the affine
weights, as TransformerLens caches it. Without a hook on the scale the norm is one fused
kernel; with one, the input is divided by the (hooked) scale explicitly, in at least float32,
so that the scale is part of the graph as in TransformerLens: an edit takes effect and
gradients reach it.
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


def apply_norm(
    x: Tensor, norm: Norm, eps: float, hooks: HookSet, scale_name: str, normalized_name: str
) -> Tensor:
    """x: [..., d] -> [..., d], normalised then scaled by w (and shifted by b)."""
    if hooks.wants(scale_name):
        x32 = upcast(x)
        if norm.kind == "LN":
            x32 = x32 - x32.mean(-1, keepdim=True)
        # mean square through vector_norm: no [..., d] temporary (var_mean is 4x slower on
        # CPU); its gradient at an all-zero row is 0, not NaN
        mean_square = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x32.shape[-1]
        scale = hooks(scale_name, (mean_square + eps).sqrt())  # [..., 1]
        return _affine(hooks(normalized_name, (x32 / scale).to(x.dtype)), norm)
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
    return normalized * norm.w if norm.b is None else torch.addcmul(norm.b, normalized, norm.w)
