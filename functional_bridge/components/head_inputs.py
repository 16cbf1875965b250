"""HookedTransformer's optional per-head hook points, computed only when a hook asks for them.

``hook_attn_in`` and ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` give every head its
own copy of the residual stream ([batch, pos, head, d_model]); ln1 then normalises each copy
(its hooks see the head dimension, as in HookedTransformer) and each head projects its own copy
with its W_Q, W_K, W_V. ``attn.hook_result`` is each head's output, z @ W_O per head
([batch, pos, head, d_model]), summed over heads plus b_O. ``hook_mlp_in`` is a copy of the
residual stream entering the MLP's norm. The default forward never runs any of this.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..hooks import HookSet, LayerHookNames
from .linear import Affine
from .norms import Norm, apply_norm


class HeadInputs(NamedTuple):
    q: Tensor  # [batch, pos, n_heads, d_model], normalised by ln1
    k: Tensor  # [batch, pos, n_kv_heads, d_model] (n_heads without grouped-query attention)
    v: Tensor  # [batch, pos, n_kv_heads, d_model]


def head_inputs(resid: Tensor, ln1: Norm, eps: float, n_heads: int, n_kv_heads: int, hooks: HookSet, names: LayerHookNames) -> HeadInputs | None:
    """Per-head attention inputs when hook_attn_in or a split q/k/v input is hooked, else None.

    As HookedTransformer with use_attn_in: q, k and v read hook_attn_in's copy, normalised once
    (HookedTransformer normalises the same tensor three times, with equal results). With
    use_split_qkv_input (any of hook_q/k/v_input hooked): each reads its own copy of resid_pre
    (not hook_attn_in's, as in HookedTransformer), normalised separately, so ln1's hooks fire
    three times and keep the value input's statistics in a cache."""
    if not hooks:
        return None
    split = hooks.wants(names.q_input) or hooks.wants(names.k_input) or hooks.wants(names.v_input)
    if not split and not hooks.wants(names.attn_in):
        return None
    if hooks.wants(names.attn_in):
        attn_in = hooks(names.attn_in, _repeat_heads(resid, n_heads))
        if not split:
            x = _ln1(attn_in, ln1, eps, hooks, names)
            return HeadInputs(x, x, x)
    q_in = hooks(names.q_input, _repeat_heads(resid, n_heads))
    k_in = hooks(names.k_input, _repeat_heads(resid, n_kv_heads))
    v_in = hooks(names.v_input, _repeat_heads(resid, n_kv_heads))
    return HeadInputs(*(_ln1(x, ln1, eps, hooks, names) for x in (q_in, k_in, v_in)))


def _ln1(x: Tensor, ln1: Norm | None, eps: float, hooks: HookSet, names: LayerHookNames) -> Tensor:
    """The attention's input norm, or x where the block has none there (OLMo 2 norms outputs)."""
    return x if ln1 is None else apply_norm(x, ln1, eps, hooks, names.ln1_scale, names.ln1_normalized)


def _repeat_heads(resid: Tensor, n: int) -> Tensor:
    """[batch, pos, d_model] -> a new [batch, pos, n, d_model] (a copy: a hook may edit it in place)."""
    return resid[:, :, None, :].repeat(1, 1, n, 1)


def project_head_inputs(x: HeadInputs, weights, n_heads: int, n_kv_heads: int, d_head: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each head's own input through its own projection: q [batch, pos, n_heads, d_head], k and v
    [batch, pos, n_kv_heads, d_head] (TransformerLens's complex_attn_linear)."""
    (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = head_projections(weights, n_heads, n_kv_heads, d_head)
    return _per_head(x.q, W_Q, b_Q), _per_head(x.k, W_K, b_K), _per_head(x.v, W_V, b_V)


def _per_head(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    out = torch.einsum("bphm,hmd->bphd", x, W)  # [batch, pos, head, d_head]
    return out if b is None else out + b


def _in_out(proj: Affine) -> Tensor:
    """The projection's weight as [d_in, d_out], whatever its storage layout (a view)."""
    return proj.weight if proj.in_out else proj.weight.T


def _heads(W: Tensor, b: Tensor | None, heads: int, d_head: int) -> tuple[Tensor, Tensor | None]:
    """[d_in, heads * d_head] -> [heads, d_in, d_head]; bias -> [heads, d_head]."""
    W = W.unflatten(-1, (heads, d_head)).permute(1, 0, 2)
    return W, None if b is None else b.view(heads, d_head)


def head_projections(weights, n_heads: int, n_kv_heads: int, d_head: int):
    """((W_Q, b_Q), (W_K, b_K), (W_V, b_V)) per head, W [heads, d_model, d_head], views of the
    leaves in any of the attention layouts (fused qkv, NeoX's per-head qkv, separate)."""
    if weights.qkv is None:
        return tuple(
            _heads(_in_out(proj), proj.bias, heads, d_head)
            for proj, heads in ((weights.q, n_heads), (weights.k, n_kv_heads), (weights.v, n_kv_heads))
        )
    W, b = _in_out(weights.qkv), weights.qkv.bias  # [d_model, 3 * ...]
    if weights.qkv_layout == "head_qkv":  # [head, 3, d_head] along the output
        W3 = W.unflatten(-1, (n_heads, 3, d_head))
        b3 = None if b is None else b.view(n_heads, 3, d_head)
        return tuple((W3[:, :, i].permute(1, 0, 2), None if b3 is None else b3[:, i]) for i in range(3))
    sizes = [n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head]
    Ws = W.split(sizes, dim=-1)
    bs = (None,) * 3 if b is None else b.split(sizes)
    return tuple(_heads(Wi, bi, heads, d_head) for Wi, bi, heads in zip(Ws, bs, (n_heads, n_kv_heads, n_kv_heads)))


def head_results(z: Tensor, o: Affine) -> Tensor:
    """z [batch, pos, head, d_head] -> each head's output [batch, pos, head, d_model]."""
    n_heads, d_head = z.shape[-2:]
    W_O = _in_out(o).unflatten(0, (n_heads, d_head))  # [head, d_head, d_model]
    return torch.einsum("bphd,hdm->bphm", z, W_O.to(z.dtype))


def mlp_input(resid: Tensor, hooks: HookSet, name: str) -> Tensor:
    """hook_mlp_in: a copy of the residual stream entering the MLP's norm, when hooked."""
    return hooks(name, resid.clone()) if hooks.wants(name) else resid
