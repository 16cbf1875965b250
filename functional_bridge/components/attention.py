"""Stateless self-attention (causal, or bidirectional for encoders) with explicit dtype promotion.

Scores and softmax are computed in float32 whatever the parameter dtype, and the pattern is cast
to the value dtype before it meets the values. With no hook on the scores or the pattern, outside
functorch transforms (CPU SDPA has no batching rule) and, on CPU, when autograd is not recording
through attention (the CPU kernel has no second derivative), the fused
``F.scaled_dot_product_attention`` runs instead: same function, within dtype tolerance (a NaN in
q, k or v propagates on both paths).

Masking follows HookedTransformer: masked scores are -inf in ``hook_attn_scores``, and a query
with no key to attend to (a left-padding position) gets an all-zero pattern, hence z = 0, with
no NaN in the forward or the backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hooks import HookSet, LayerHookNames
from .linear import Affine, affine
from .norms import Norm
from .precision import upcast


class AttentionWeights(NamedTuple):
    qkv: Affine | None  # fused projection whose output splits as qkv_layout says, or None
    q: Affine | None  # separate projections when there is no fused one
    k: Affine | None
    v: Affine | None
    o: Affine  # [n_heads * d_head] -> [d_model]
    qkv_layout: str = "qkv"  # "qkv": [q heads | k heads | v heads]; "head_qkv": [head, 3, d_head]
    q_norm: Norm | None = None  # per-head norm on queries and keys (Qwen3)
    k_norm: Norm | None = None


class AttentionMask(NamedTuple):
    """Which keys each query may attend to, built once per forward and shared by all layers."""

    allowed: Tensor | None  # [batch or 1, 1, query_pos or 1, key_pos] bool: causal (and window) and
    # not padding; None: every key (bidirectional, no padding)
    has_key: Tensor | None  # [batch, 1, query_pos or 1, 1] bool: the query has a key to attend to; None without a padding mask
    is_plain_causal: bool  # no padding and no window: SDPA's is_causal=True suffices
    in_transform: bool = False  # the forward's inputs are vmapped: use the explicit path
    causal: Tensor | None = None  # [query_pos, key_pos] bool: causal (and window) alone; all True if bidirectional
    keys: Tensor | None = None  # [batch, 1, 1, key_pos] bool: real tokens; None without padding
    bias: Tensor | None = None  # [batch or 1, head, query_pos, key_pos] float32 added to the scores (ALiBi)


def build_attention_mask(
    query_len: int,
    key_mask: Tensor | None,
    device: torch.device,
    window: int | None = None,
    in_transform: bool = False,
) -> AttentionMask:
    """key_mask: [batch, key_pos], True/1 at real tokens (None: no padding). A window no shorter
    than the sequence masks nothing, so it is dropped (keeping SDPA's is_causal path)."""
    if window is not None and window >= query_len:
        window = None
    positions = torch.arange(query_len, device=device)
    causal = positions[None, :] <= positions[:, None]  # [query_pos, key_pos]
    if window is not None:
        causal = causal & (positions[None, :] > positions[:, None] - window)
    if key_mask is None:
        return AttentionMask(causal[None, None], None, window is None, in_transform, causal, None)
    keys = key_mask.bool()[:, None, None, :]
    allowed = causal[None, None] & keys
    return AttentionMask(allowed, allowed.any(-1, keepdim=True), False, in_transform, causal, keys)


def build_bidirectional_mask(
    query_len: int, key_mask: Tensor | None, device: torch.device, in_transform: bool = False
) -> AttentionMask:
    """An encoder's mask: every query attends to every real key. key_mask: [batch, key_pos],
    True/1 at real tokens (None: no padding). Padding queries attend to the real keys too, as
    HF's encoders do; a row with no real token gets an all-zero pattern."""
    everything = torch.ones(query_len, query_len, dtype=torch.bool, device=device)  # [query_pos, key_pos]
    if key_mask is None:
        return AttentionMask(None, None, False, in_transform, everything, None)
    keys = key_mask.bool()[:, None, None, :]  # [batch, 1, 1, key_pos]
    return AttentionMask(keys, keys.any(-1, keepdim=True), False, in_transform, everything, keys)


def project_qkv(x: Tensor, weights: AttentionWeights, n_heads: int, n_kv_heads: int, d_head: int):
    """x: [batch, pos, d_model] -> q [batch, pos, n_heads, d_head], k and v [.., n_kv_heads, ..]."""
    lead = x.shape[:-1]
    if weights.qkv is None:
        q = affine(x, weights.q).view(*lead, n_heads, d_head)
        k = affine(x, weights.k).view(*lead, n_kv_heads, d_head)
        v = affine(x, weights.v).view(*lead, n_kv_heads, d_head)
        return q, k, v
    fused = affine(x, weights.qkv)
    if weights.qkv_layout == "head_qkv":
        return fused.view(*lead, n_heads, 3, d_head).unbind(-2)
    q, k, v = fused.split([n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head], dim=-1)
    return q.view(*lead, n_heads, d_head), k.view(*lead, n_kv_heads, d_head), v.view(*lead, n_kv_heads, d_head)


def inside_functorch_transform(*tensors: Tensor | None) -> bool:
    """Whether vmap/grad/jvp is active. Exact in eager mode. Under torch.compile, dynamo cannot
    trace the interpreter stack, so this sees only tensors that are themselves vmap-batched:
    pass every input that may be (the forward passes its tokens and mask, attend its queries)."""
    if torch.compiler.is_compiling():
        return any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in tensors)
    return torch._C._functorch.maybe_current_level() is not None


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    attn_scale: float,
    hooks: HookSet,
    names: LayerHookNames,
    soft_cap: float | None = None,
) -> Tensor:
    """q: [batch, q_pos, n_heads, d_head], k, v: [batch, k_pos, n_kv_heads, d_head] -> z like q.
    soft_cap: scores (after the scale, before the mask and any bias) -> cap * tanh(scores / cap),
    which SDPA cannot do: the explicit path runs (as HF runs Gemma 2 eagerly)."""
    if soft_cap is not None or _needs_explicit(q, k, v, mask, hooks, names):
        z = _explicit_attention(q, k, v, mask, attn_scale, hooks, names, soft_cap)
    else:
        z = _sdpa_attention(q, k, v, mask, attn_scale)
    return hooks(names.z, z)


def _needs_explicit(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, hooks: HookSet, names) -> bool:
    """The explicit path runs when a hook reads the scores or pattern; inside functorch
    transforms (CPU SDPA has no batching rule); and on CPU while autograd records through
    attention, because the CPU fused kernel's backward has no derivative (second-order
    gradients, e.g. ``autograd.grad(..., create_graph=True)``, would fail) and at the sizes a CPU
    trains the explicit path is as fast (bench: suite grads)."""
    if hooks.wants(names.attn_scores) or hooks.wants(names.pattern):
        return True
    if mask.in_transform or inside_functorch_transform(q):
        return True
    recording = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return recording and q.device.type == "cpu"


def _sdpa_attention(q, k, v, mask: AttentionMask, attn_scale: float) -> Tensor:
    gqa = {"enable_gqa": True} if k.shape[-2] != q.shape[-2] else {}
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [batch, head, pos, d_head]
    if mask.is_plain_causal and mask.bias is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=1.0 / attn_scale, **gqa)
        return (out + _nan_probe(qt, kt, vt, None)).transpose(1, 2)
    allowed = mask.allowed if mask.has_key is None else mask.allowed | ~mask.has_key  # None: every key
    if mask.bias is not None:  # a float mask: the bias where allowed, -inf elsewhere
        bias = mask.bias.to(q.dtype)
        allowed = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=1.0 / attn_scale, **gqa)
    out = out + _nan_probe(qt, kt, vt, mask.keys)
    if mask.has_key is not None:  # rows with no key: z = 0, as the explicit path gives
        out = out.masked_fill(~mask.has_key, 0.0)
    return out.transpose(1, 2)


def _nan_probe(qt: Tensor, kt: Tensor, vt: Tensor, keys: Tensor | None) -> Tensor:
    """[batch, head, q_pos, 1]: zero, or NaN where the explicit path (and HF eager) give a NaN
    that fused kernels drop: a NaN query row, or a NaN in a head's real keys or its values (a
    NaN weight, say). qt: [batch, head, q_pos, d_head]; kt, vt: [batch, kv_head, k_pos, d_head];
    keys: [batch, 1, 1, k_pos] real-token mask or None. Reads q, k and v once: cheap."""
    f32 = torch.float32  # sums in float32: a float16 sum of finite values could overflow to inf
    key_rows = kt.sum(-1, dtype=f32)  # [batch, kv_head, k_pos]: reduce first, then mask the small tensor
    if keys is not None:
        key_rows = key_rows.masked_fill(~keys[:, :, 0], 0.0)  # NaNs at padding keys are masked out
    per_head = (key_rows.sum(-1) + vt.sum((-2, -1), dtype=f32))[..., None, None]  # [batch, kv_head, 1, 1]
    query_rows = qt.sum(-1, keepdim=True, dtype=f32)  # [batch, head, q_pos, 1]
    batch, heads, q_len, _ = query_rows.shape
    if kt.shape[1] != heads:  # grouped-query: the heads of one key/value head are adjacent
        grouped = query_rows.view(batch, kt.shape[1], -1, 1) + per_head  # [batch, kv_head, group * q_pos, 1]
        return (grouped.view(batch, heads, q_len, 1) * 0).to(qt.dtype)
    return ((query_rows + per_head) * 0).to(qt.dtype)


def _explicit_attention(
    q, k, v, mask: AttentionMask, attn_scale, hooks: HookSet, names: LayerHookNames, soft_cap: float | None = None
):
    """Scores, pattern and z as HookedTransformer computes them, with the scale and the causal
    mask folded into one baddbmm (when no soft cap must come between them). Grouped-query heads
    share their key/value head without copies: the `group` query heads of one key/value head are
    stacked along the query positions."""
    batch, q_len, n_heads, d_head = q.shape
    n_kv, k_len = k.shape[-2], k.shape[1]
    group = n_heads // n_kv
    q3 = upcast(q).transpose(1, 2).reshape(batch * n_kv, group * q_len, d_head)  # [batch*kv, group*q_pos, d_head]
    k3 = upcast(k).permute(0, 2, 3, 1).reshape(batch * n_kv, d_head, k_len)  # [batch*kv, d_head, k_pos]
    if soft_cap is None:
        causal = torch.zeros(mask.causal.shape, dtype=q3.dtype, device=q3.device).masked_fill(~mask.causal, float("-inf"))
        scores = torch.baddbmm(causal.repeat(group, 1), q3, k3, alpha=1.0 / attn_scale)
        scores = scores.view(batch, n_heads, q_len, k_len)  # [batch, head, q_pos, k_pos]
    else:  # HF's order: scale, cap, then the mask
        scores = (torch.bmm(q3, k3) * (1.0 / attn_scale)).view(batch, n_heads, q_len, k_len)
        scores = ((scores / soft_cap).tanh() * soft_cap).masked_fill(~mask.causal, float("-inf"))
    if mask.bias is not None:
        scores = scores + mask.bias
    if mask.keys is not None:
        scores = scores.masked_fill(~mask.keys, float("-inf"))
    scores = hooks(names.attn_scores, scores)
    if mask.has_key is None:
        pattern = scores.softmax(-1)
    else:  # softmax of an all -inf row is NaN: give such rows finite scores, then zero them
        pattern = scores.masked_fill(~mask.has_key, 0.0).softmax(-1).masked_fill(~mask.has_key, 0.0)
    pattern = hooks(names.pattern, pattern.to(v.dtype))
    v3 = v.transpose(1, 2).reshape(batch * n_kv, k_len, d_head)  # [batch*kv, k_pos, d_head]
    z = torch.bmm(pattern.reshape(batch * n_kv, group * q_len, k_len), v3)  # [batch*kv, group*q_pos, d_head]
    return z.view(batch, n_heads, q_len, d_head).transpose(1, 2)


def attention_output(z: Tensor, o: Affine) -> Tensor:
    """z: [batch, pos, head, d_head] -> [batch, pos, d_model]."""
    return affine(z.reshape(*z.shape[:-2], z.shape[-2] * z.shape[-1]), o)
