"""The pure transformer: forward(params, tokens, cfg) -> logits, and its cached/hooked variants.

Everything here is a function of its arguments: no module state, no in-place writes to inputs,
no Python branch on a tensor's value (the input checks that need values run only outside
functorch transforms and torch.compile). That is what lets torch.func.vmap, grad, jvp and
torch.compile take it. run_with_cache and run_with_hooks live here, next to forward, because
they are forward with hooks; hooks.py stays free of the model.
"""

from __future__ import annotations

from typing import Collection, Iterable, Sequence

import torch
from torch import Tensor

from .architectures import family_for
from .architectures.family import EmbedWeights, LayerWeights
from .components.attention import (
    AttentionMask,
    attend,
    attention_output,
    build_attention_mask,
    inside_functorch_transform,
    project_qkv,
)
from .components.embed import embed_tokens, learned_positions, position_ids
from .components.alibi import alibi_bias
from .components.head_inputs import HeadInputs, head_inputs, head_results, mlp_input, project_head_inputs
from .components.linear import affine
from .components.mlp import ACTIVATIONS, mlp
from .components.moe import MoEWeights, moe
from .components.norms import Norm, apply_norm
from .components.precision import upcast
from .components.rotary import Rotary, apply_rotary, rotary_tables
from .config import BridgeConfig
from .hooks import HookFn, HookSet, NameOrFilter, layer_hook_names, resolve_hooks, select_names
from .params import Params, check_params, params_dtype, refuse_sharded
from .placement import TableCache, block_device, input_device

Hooks = Iterable[tuple[NameOrFilter, HookFn]]


def forward(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    attention_mask: Tensor | None = None,
    hooks: Hooks | HookSet | None = None,
    bwd_hooks: Hooks = (),
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    optional_hooks: Collection[str] = (),
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """Logits [batch, pos, d_vocab_out] for tokens [batch, pos] (a 1-D tokens gets batch 1).

    attention_mask [batch, pos] marks real tokens (1) and padding (0), on either side: positions
    count real tokens only, so each row's logits at its real positions equal that row run alone.
    (An encoder, BERT, counts positions absolutely, padding included, as HF does: encoder.py.)
    hooks: ``[(name or predicate, fn), ...]``, TransformerLens hook functions; bwd_hooks alike,
    ``fn(grad, hook) -> grad or None``, attached to this call's activations as autograd hooks.
    optional_hooks: HookedTransformer flags (``"use_attn_result"``...) whose optional hook points
    predicates may select. start_at_layer / stop_at_layer as HookedTransformer's (Python slice
    semantics over the blocks, negative allowed): with start_at_layer, ``tokens`` is the residual
    stream [batch, pos, d_model] entering that block; with stop_at_layer, the residual stream
    leaving block stop_at_layer - 1 is returned instead of logits.
    token_type_ids [batch, pos]: an encoder's segment ids (BERT; default 0); causal LMs have none.
    """
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask, residual=start_at_layer is not None)
    token_type_ids = check_token_type_ids(token_type_ids, tokens, cfg)
    hooks = resolve_hooks(cfg, hooks, bwd_hooks, optional_hooks)
    return transformer(
        params, tokens, cfg, attention_mask, hooks, token_type_ids, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer
    )  # fmt: skip


def run_with_hooks(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    fwd_hooks: Hooks = (),
    bwd_hooks: Hooks = (),
    attention_mask: Tensor | None = None,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    optional_hooks: Collection[str] = (),
    token_type_ids: Tensor | None = None,
) -> Tensor:
    """forward with TransformerLens-style ``fwd_hooks=[(name or predicate, fn)]`` (and
    ``bwd_hooks``, attached to this call's activations)."""
    return forward(
        params, tokens, cfg, attention_mask=attention_mask, hooks=fwd_hooks, bwd_hooks=bwd_hooks,
        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, optional_hooks=optional_hooks,
        token_type_ids=token_type_ids,
    )  # fmt: skip


def run_with_cache(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    names_filter: NameOrFilter | Sequence[str] | None = None,
    attention_mask: Tensor | None = None,
    fwd_hooks: Hooks = (),
    detach: bool = False,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    optional_hooks: Collection[str] = (),
    token_type_ids: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(logits, cache): cache maps each hook name chosen by names_filter (a name, a list of
    names, a predicate, or None for all) to its activation, in execution order. fwd_hooks run
    before caching, so the cache shows edited activations. The cache is returned, never stored:
    this works inside vmap and grad. detach=True detaches the cached tensors (TransformerLens's
    behaviour); the default keeps them differentiable. A name list may name optional hook
    points (``blocks.0.attn.hook_result``); a predicate or None includes those of the
    ``optional_hooks`` flags. start_at_layer / stop_at_layer as in forward."""
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask, residual=start_at_layer is not None)
    token_type_ids = check_token_type_ids(token_type_ids, tokens, cfg)
    cache: dict[str, Tensor] = {}

    def save(activation: Tensor, hook) -> None:
        cache[hook.name] = activation.detach() if detach else activation

    names = select_names(cfg, names_filter, optional_hooks)
    hooks = resolve_hooks(cfg, fwd_hooks, (), optional_hooks).appended(names, save)
    logits = transformer(
        params, tokens, cfg, attention_mask, hooks, token_type_ids, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer
    )  # fmt: skip
    return logits, cache


def check_inputs(
    params: Params, tokens: Tensor, cfg: BridgeConfig, attention_mask: Tensor | None, residual: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Validate params, tokens and mask; return tokens as int64 [batch, pos] and the mask as
    bool [batch, pos] (HF's rule: any nonzero value marks a real token). A 1-D tokens (and
    mask) gets batch 1. Raises before any work, naming the shapes as they were passed.
    residual=True: ``tokens`` is a residual stream [batch, pos, d_model] (start_at_layer)."""
    check_params(params, cfg)
    device = input_device(params, cfg)  # leaves placed by layer: the embedding's device
    params_dtype(params)  # mixed floating dtypes: the clear error bridge.dtype gives
    if residual:
        return _check_residual(tokens, cfg, attention_mask, device)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a tensor of token ids, got {type(tokens).__name__}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor of token ids, got dtype {tokens.dtype}")
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    passed = f"tokens {tuple(tokens.shape)}" + ("" if attention_mask is None else f", attention_mask {tuple(attention_mask.shape)}")
    if tokens.dim() == 1:
        tokens = tokens[None]
        if attention_mask is not None and attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, pos] (or [pos]), got shape {tuple(tokens.shape)}")
    if tokens.device != device:
        raise ValueError(f"tokens are on {tokens.device} but params are on {device}")
    if tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={cfg.n_ctx}")
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask and tokens must have the same shape; got {passed}")
        attention_mask = _checked_mask(attention_mask, device)
    if _values_readable(tokens) and tokens.numel():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= cfg.d_vocab:
            raise ValueError(
                f"token ids must be in [0, {cfg.d_vocab}) (d_vocab={cfg.d_vocab}); got ids from {low} to {high}"
            )
    if tokens.dtype != torch.long:  # uint8/int8 would index the embedding as a boolean mask
        tokens = tokens.long()
    return tokens, attention_mask


def _check_residual(resid: Tensor, cfg: BridgeConfig, attention_mask: Tensor | None, device) -> tuple[Tensor, Tensor | None]:
    if not isinstance(resid, Tensor) or not resid.is_floating_point():
        got = resid.dtype if isinstance(resid, Tensor) else type(resid).__name__
        raise TypeError(f"with start_at_layer the input is the residual stream, a float tensor [batch, pos, d_model]; got {got}")
    if resid.dim() == 2:
        resid = resid[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    if resid.dim() != 3 or resid.shape[-1] != cfg.d_model:
        raise ValueError(f"with start_at_layer the input must be [batch, pos, d_model={cfg.d_model}], got {tuple(resid.shape)}")
    if resid.device != device:
        raise ValueError(f"the residual input is on {resid.device} but params are on {device}")
    if resid.shape[1] > cfg.n_ctx:
        raise ValueError(f"sequence length {resid.shape[1]} exceeds the model's context n_ctx={cfg.n_ctx}")
    if attention_mask is not None:
        if attention_mask.shape != resid.shape[:2]:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the residual input {tuple(resid.shape[:2])} positions")
        attention_mask = _checked_mask(attention_mask, device)
    return resid, attention_mask


def _checked_mask(attention_mask: Tensor, device) -> Tensor:
    """The mask as bool (HF's rule: any nonzero value marks a real token), after its checks."""
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but params are on {device}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool or integer (nonzero = real token), got {attention_mask.dtype}")
    return attention_mask != 0


def layer_range(cfg: BridgeConfig, start_at_layer: int | None, stop_at_layer: int | None) -> range:
    """The blocks a forward runs: HookedTransformer's ``blocks[start_at_layer:stop_at_layer]``."""
    for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
        if value is not None and not isinstance(value, int):
            raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
    return range(cfg.n_layers)[start_at_layer:stop_at_layer]


def check_token_type_ids(token_type_ids: Tensor | None, tokens: Tensor, cfg: BridgeConfig) -> Tensor | None:
    """Validate an encoder's token types against checked tokens [batch, pos]; return them as
    int64 [batch, pos] (a 1-D one gets batch 1), as tokens. Models without token types refuse them."""
    if token_type_ids is None:
        return None
    if not cfg.n_token_types:
        raise ValueError(f"token_type_ids given, but {cfg.original_architecture} has no token-type embeddings")
    if not isinstance(token_type_ids, Tensor):
        raise TypeError(f"token_type_ids must be a tensor of integer ids, got {type(token_type_ids).__name__}")
    if token_type_ids.is_floating_point() or token_type_ids.is_complex() or token_type_ids.dtype == torch.bool:
        raise TypeError(f"token_type_ids must be an integer tensor, got dtype {token_type_ids.dtype}")
    if token_type_ids.dim() == 1:
        token_type_ids = token_type_ids[None]
    if token_type_ids.shape != tokens.shape:
        raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}, tokens {tuple(tokens.shape)}")
    if token_type_ids.device != tokens.device:
        raise ValueError(f"token_type_ids are on {token_type_ids.device} but tokens are on {tokens.device}")
    if _values_readable(token_type_ids) and token_type_ids.numel():
        low, high = int(token_type_ids.min()), int(token_type_ids.max())
        if low < 0 or high >= cfg.n_token_types:
            raise ValueError(f"token_type_ids must be in [0, {cfg.n_token_types}); got ids from {low} to {high}")
    return token_type_ids.long()  # uint8/int8 would index the embedding as a boolean mask


def _values_readable(tensor: Tensor) -> bool:
    """True outside torch.compile and functorch transforms, where a value check is allowed."""
    if torch.compiler.is_compiling():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def transformer(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    attention_mask: Tensor | None,
    hooks: HookSet,
    token_type_ids: Tensor | None = None,
    *,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    unembed: bool = True,
    kv_step=None,
    logits_to_keep: int | None = None,
    run_block=None,
) -> Tensor | None:
    """The forward pass on checked inputs: tokens [batch, pos] -> logits [batch, pos, d_vocab_out].
    A family with its own forward (an encoder) runs that instead of the decoder stack below.
    With start_at_layer, tokens is the residual stream [batch, pos, d_model] entering that block;
    with stop_at_layer, the residual stream leaving the last block run is returned. unembed=False
    stops after ln_final and returns None (HookedTransformer's return_type=None).
    kv_step: a kv_cache.CacheStep: tokens are new tokens after its cached ones (kv_cache.py).
    logits_to_keep: the logits of the last n positions only (kv_cache.forward_with_kv_cache).

    run_block(layer, step, resid) -> resid: how block ``layer`` runs; ``step(resid, params)`` is
    the pure block on a params pytree that the runner supplies (a sharded bridge calls the
    block's container module, whose FSDP2 hooks gather that block's leaves around the call:
    distributed/fsdp.py). None: the block runs on ``params``, which must then hold no shards."""
    family = family_for(cfg)
    if run_block is None:
        refuse_sharded(params, "the pure forward")
    if family.forward is not None:
        if start_at_layer is not None or not unembed:
            raise NotImplementedError(f"start_at_layer and return_type=None are not supported for {cfg.original_architecture}")
        layers = layer_range(cfg, None, stop_at_layer)  # (checks stop_at_layer)
        return family.forward(params, tokens, cfg, attention_mask, hooks, token_type_ids, None if stop_at_layer is None else len(layers))
    batch, seq = tokens.shape[:2]
    device = tokens.device
    positions = position_ids(attention_mask, seq, device) if kv_step is None else kv_step.positions  # [batch or 1, pos]
    if start_at_layer is None:
        resid = _embed(family.embed_weights(params, cfg), tokens, positions, attention_mask, cfg, hooks, kv_step is None)
    else:
        resid = tokens  # [batch, pos, d_model]
    # masks: one per distinct window span; rotary tables: one per kind of layer (global, or local
    # with its own base); each built on the input device, copied to any other a block is on
    tables = TableCache()
    in_transform = inside_functorch_transform(tokens, attention_mask)  # CPU SDPA cannot be vmapped
    bias = None
    if cfg.positional_embedding_type == "alibi":
        bias = alibi_bias(positions, cfg.n_heads) if kv_step is None else kv_step.alibi(cfg.n_heads)

    def build_mask(window):
        mask = build_attention_mask(seq, attention_mask, device, window, in_transform) if kv_step is None else kv_step.attention_mask(window, in_transform)
        return mask if bias is None else mask._replace(bias=bias)

    for layer in layer_range(cfg, start_at_layer, stop_at_layer):
        # leaves placed by layer: the residual stream follows the block (a sharded bridge's
        # run_block supplies whole leaves during the call: its shards are not read here)
        w = family.layer_weights(params, cfg, layer) if run_block is None else None
        here = resid.device if w is None else block_device(w)
        resid = resid.to(here)
        window = cfg.layer_window(layer)
        mask = tables.get(("mask", window), here, lambda: build_mask(window))
        rotary = None
        if cfg.positional_embedding_type == "rotary":
            local = cfg.layer_uses_local_rope(layer)
            dtype = upcast(resid).dtype if cfg.rotary_in_float32 else resid.dtype
            rotary = tables.get(("rotary", local), here, lambda: rotary_tables(positions, cfg, dtype, local))
        extend_kv = None if kv_step is None else kv_step.layer(layer)
        if run_block is None:
            resid = block(resid, w, cfg, layer, mask, hooks, rotary, extend_kv)
        else:
            def step(resid, params, layer=layer, mask=mask, rotary=rotary, extend_kv=extend_kv):
                return block(resid, family.layer_weights(params, cfg, layer), cfg, layer, mask, hooks, rotary, extend_kv)

            resid = run_block(layer, step, resid)
    if stop_at_layer is not None:
        return resid
    final = family.unembed_weights(params, cfg)
    x = resid.to(block_device(final))
    if logits_to_keep is not None and not any(hooks.wants(name) for name in _FINAL_HOOKS):
        x = x[:, -logits_to_keep:]  # the norm and unembedding act per position
    if final.ln_final is not None:
        x = apply_norm(x, final.ln_final, cfg.eps, hooks, "ln_final.hook_scale", "ln_final.hook_normalized")
    if not unembed:
        return None
    if final.project_out is not None:
        x = affine(x, final.project_out)
    x = hooks("unembed.hook_in", x)
    logits = hooks("unembed.hook_out", affine(x, final.unembed))
    if logits_to_keep is not None:
        logits = logits[:, -logits_to_keep:]
    return soft_cap(logits, cfg.output_logits_soft_cap)


_FINAL_HOOKS = ("ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out")


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap) (Gemma's soft-capping), or x when cap is None."""
    return x if cap is None else (x / cap).tanh() * cap


def _embed(
    weights: EmbedWeights, tokens, positions, attention_mask, cfg: BridgeConfig, hooks: HookSet, from_zero: bool = True
) -> Tensor:
    """[batch, pos, d_model]: token embedding (scaled, normed or projected as the family says)
    plus learned positions where the family has them. from_zero: positions start at 0 (False
    after a KV cache's tokens)."""
    embed = embed_tokens(tokens, weights.W_E)
    if weights.scale is not None:  # in the embedding's dtype, from a float32 scalar, as HF's buffer
        embed = embed * torch.tensor(weights.scale, dtype=torch.float32).to(embed.dtype)
    if weights.ln is not None:
        embed = apply_norm(embed, weights.ln, cfg.eps, hooks, "embed.ln.hook_scale", "embed.ln.hook_normalized")
    if weights.project_in is not None:
        embed = affine(embed, weights.project_in)
    resid = hooks("hook_embed", embed)
    if weights.W_pos is None:
        return resid
    if attention_mask is None and from_zero and not hooks.wants("hook_pos_embed"):
        return resid + weights.W_pos[: tokens.shape[1]]  # broadcast over batch, no copy
    pos = learned_positions(weights.W_pos, positions, attention_mask, tokens.shape[0])
    return resid + hooks("hook_pos_embed", pos)


def _norm(x: Tensor, norm: Norm | None, cfg: BridgeConfig, hooks: HookSet, scale_name, normalized_name) -> Tensor:
    """apply_norm, or x itself where the block has no norm at this place."""
    return x if norm is None else apply_norm(x, norm, cfg.eps, hooks, scale_name, normalized_name)


def block(
    resid: Tensor,
    w: LayerWeights,
    cfg: BridgeConfig,
    layer: int,
    mask: AttentionMask,
    hooks: HookSet,
    rotary: Rotary | None = None,
    extend_kv=None,
) -> Tensor:
    """One transformer block: resid [batch, pos, d_model] -> [batch, pos, d_model]. Each norm the
    family gives applies at its place (inputs, outputs, or residual sums: LayerWeights).
    extend_kv(k, v) -> (k, v): prepends cached keys and values (kv_cache.py); None: no cache."""
    n = layer_hook_names(cfg, layer)
    resid = hooks(n.resid_pre, resid)
    # per-head inputs only when hook_attn_in / hook_q_input... is hooked (components/head_inputs.py)
    x = head_inputs(resid, w.ln1, cfg.eps, cfg.n_heads, cfg.n_kv_heads, hooks, n)
    if x is None:
        x = _norm(resid, w.ln1, cfg, hooks, n.ln1_scale, n.ln1_normalized)
    elif cfg.residual_from_norm:
        raise NotImplementedError(f"{cfg.original_architecture}: per-head attention inputs (hook_attn_in, hook_q_input...) with residual_from_norm")
    attn_out = _attention(x, w, cfg, layer, mask, hooks, n, rotary, extend_kv)
    attn_out = hooks(n.attn_out, _norm(attn_out, w.ln1_post, cfg, hooks, n.ln1_post_scale, n.ln1_post_normalized))
    if cfg.parallel_attn_mlp:  # attention and MLP both read resid_pre
        mlp_in = mlp_input(resid, hooks, n.mlp_in)
        reuse = w.ln2 is None and isinstance(x, Tensor) and mlp_in is resid and not _hooks_on_norms(hooks, n)
        x2 = x if reuse else _ln2_parallel(mlp_in, w, cfg, hooks, n)
        mlp_out = _mlp(x2, w, cfg, hooks, n)
        return hooks(n.resid_post, attn_out + mlp_out + resid)  # HF's order (NeoX, GPT-J, Phi)
    resid = (x if cfg.residual_from_norm else resid) + attn_out
    resid = hooks(n.resid_mid, _norm(resid, w.ln1_resid, cfg, hooks, n.ln1_resid_scale, n.ln1_resid_normalized))
    x = _norm(mlp_input(resid, hooks, n.mlp_in), w.ln2, cfg, hooks, n.ln2_scale, n.ln2_normalized)
    resid = (x if cfg.residual_from_norm else resid) + _mlp(x, w, cfg, hooks, n)
    return hooks(n.resid_post, _norm(resid, w.ln2_resid, cfg, hooks, n.ln2_resid_scale, n.ln2_resid_normalized))


def _mlp(x: Tensor, w: LayerWeights, cfg: BridgeConfig, hooks: HookSet, n) -> Tensor:
    """The MLP (or mixture of experts) and its output norm: [batch, pos, d_model] -> the same.
    mlp.hook_in (HookedSAETransformer's, optional) sees what the MLP reads."""
    x = hooks(n.mlp_hook_in, x)
    if isinstance(w.mlp, MoEWeights):
        out = moe(x, w.mlp, ACTIVATIONS[cfg.act_fn], hooks, n)
    else:
        out = mlp(x, w.mlp, cfg.act_fn, hooks, n)
    return hooks(n.mlp_out, _norm(out, w.ln2_post, cfg, hooks, n.ln2_post_scale, n.ln2_post_normalized))


def _hooks_on_norms(hooks: HookSet, names) -> bool:
    return any(hooks.wants(n) for n in (names.ln1_scale, names.ln1_normalized, names.ln2_scale, names.ln2_normalized))


def _ln2_parallel(resid: Tensor, w: LayerWeights, cfg: BridgeConfig, hooks: HookSet, names) -> Tensor:
    """The MLP's norm in a parallel block. GPT-J has none (its MLP reads ln1's output); as
    HookedTransformer, it is then ln1's weights applied again under ln2's hook names, so that
    edits at ln1 hooks do not reach the MLP."""
    ln2 = w.ln1 if w.ln2 is None else w.ln2
    return apply_norm(resid, ln2, cfg.eps, hooks, names.ln2_scale, names.ln2_normalized)


def _qk_norm(x: Tensor, norm: Norm, cfg: BridgeConfig, hooks: HookSet, scale_name, normalized_name) -> Tensor:
    """q or k [batch, pos, head, d_head] -> the same, normed per head (Qwen3, Gemma 3: hooks see
    [batch * pos * head, d_head], as HookedTransformer's) or over all heads' dims at once (OLMo 2:
    hooks see [batch, pos, head * d_head])."""
    flat = x.flatten(-2) if cfg.qk_norm_over_heads else x.reshape(-1, x.shape[-1])
    return apply_norm(flat, norm, cfg.eps, hooks, scale_name, normalized_name).view(x.shape)


def _attention(
    x: Tensor | HeadInputs, w: LayerWeights, cfg: BridgeConfig, layer: int, mask, hooks: HookSet, names, rotary: Rotary | None,
    extend_kv=None,
) -> Tensor:
    """[batch, pos, d_model] (or per-head inputs) -> attention output [batch, pos, d_model]."""
    if isinstance(x, HeadInputs):
        q, k, v = project_head_inputs(x, w.attn, cfg.n_heads, cfg.n_kv_heads, cfg.d_head)
    else:
        q, k, v = project_qkv(x, w.attn, cfg.n_heads, cfg.n_kv_heads, cfg.d_head)  # [batch, pos, head, d_head]
    q, k, v = hooks(names.q, q), hooks(names.k, k), hooks(names.v, v)
    if w.attn.q_norm is not None:
        q = _qk_norm(q, w.attn.q_norm, cfg, hooks, names.q_norm_scale, names.q_norm_normalized)
        k = _qk_norm(k, w.attn.k_norm, cfg, hooks, names.k_norm_scale, names.k_norm_normalized)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    if rotary is not None:
        q = hooks(names.rot_q, apply_rotary(q, rotary))
        k = hooks(names.rot_k, apply_rotary(k, rotary))
    if extend_kv is not None:
        k, v = extend_kv(k, v)  # [batch, cached + pos, n_kv_heads, d_head]
    scale = cfg.attn_scale * (layer + 1 if cfg.scale_attn_by_inverse_layer_idx else 1)
    z = attend(q, k, v, mask, scale, hooks, names, cfg.attn_scores_soft_cap)
    if hooks.wants(names.result):  # HookedTransformer's use_attn_result
        result = hooks(names.result, head_results(z, w.attn.o))  # [batch, pos, head, d_model]
        return result.sum(-2) if w.attn.o.bias is None else result.sum(-2) + w.attn.o.bias
    return attention_output(z, w.attn.o)
