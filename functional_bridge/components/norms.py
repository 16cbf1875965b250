"""LayerNorm and RMSNorm with TransformerLens's hook points (hook_scale, hook_normalized).

hook_scale is [batch, pos, 1]; hook_normalized is the normalised input before the affine
weights, as TransformerLens caches it. Families differ in how the weights apply, and a Norm says
how: Gemma's RMSNorm scales by (1 + w) in float32 and casts after (``plus_one``, which implies
``float32_weight``); OLMo 2's multiplies by w in float32 then casts (``float32_weight``); Llama's
casts first, then multiplies; OLMo's LayerNorm has no weights at all (w None, in float32). Without a hook on the scale the norm is one fused
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
    w: Tensor | None  # [d]; None: no weights (OLMo's non-parametric LayerNorm)
    b: Tensor | None  # [d]; None for RMSNorm
    kind: str  # "LN" or "RMS"
    plus_one: bool = False  # scale by (1 + w) (Gemma)
    float32_weight: bool = False  # apply the weights to the float32 normalised value, then cast


def apply_norm(
    x: Tensor, norm: Norm, eps: float, hooks: HookSet, scale_name: str, normalized_name: str
) -> Tensor:
    """x: [..., d] -> [..., d], normalised then scaled by w (and shifted by b)."""
    if norm.float32_weight or norm.plus_one or norm.w is None:
        return _float32_norm(x, norm, eps, hooks, scale_name, normalized_name)
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


def _float32_norm(x: Tensor, norm: Norm, eps: float, hooks: HookSet, scale_name: str, normalized_name: str) -> Tensor:
    """Norms whose weights apply in float32 before the cast back (Gemma, OLMo 2), or that have no
    weights (OLMo: F.layer_norm in float32). With hooks, the normalised value is hooked in the
    activation dtype, as TransformerLens's, and the weights applied to it in float32."""
    x32 = upcast(x)
    if hooks.wants(scale_name) or hooks.wants(normalized_name):
        if norm.kind == "LN":
            x32 = x32 - x32.mean(-1, keepdim=True)
        mean_square = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square() / x32.shape[-1]
        scale = hooks(scale_name, (mean_square + eps).sqrt())  # [..., 1]
        normalized = upcast(hooks(normalized_name, (x32 / scale).to(x.dtype)))
    elif norm.kind == "LN":
        normalized = F.layer_norm(x32, x32.shape[-1:], None, None, eps)
    else:
        normalized = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if norm.w is not None:
        w = upcast(norm.w)
        normalized = normalized * (1.0 + w) if norm.plus_one else w * normalized
    if norm.b is not None:
        normalized = normalized + upcast(norm.b)
    return normalized.to(x.dtype)


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps), computed in float32 and cast back, as HF's RMSNorms do."""
    x32 = upcast(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _affine(normalized: Tensor, norm: Norm) -> Tensor:
    return normalized * norm.w if norm.b is None else torch.addcmul(norm.b, normalized, norm.w)
