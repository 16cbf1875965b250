"""Residual-stream analyses over a cache: TransformerLens 3.9's accumulated_resid,
decompose_resid, apply_ln_to_stack, logit_attrs and stack_activation.

Functions of an ActivationCache (its activations, and a model whose leaves give the weights at
call time); ActivationCache exposes them as methods. Options, labels, shapes, values and the
order of operations are TL's. A stack is [component, *batch_and_pos, d_model]; ``layer`` counts
the blocks whose outputs are included (None or -1: all, i.e. the input to the unembedding).
The per-head and per-neuron stacks are in component_stacks.py.

Where a norm sits on the attention or MLP output (Gemma 2/3's ln1_post/ln2_post, OLMo 2's),
a component's contribution is taken through it with the norm's scale frozen at its cached value
(the norm is linear once its scale is fixed: output_norm_weight, output_norm_scale), so the
components still sum to the residual stream; TransformerLens 3.9 leaves those norms out, and its
per-head results do not sum there. Norms on the residual sums (post-LN) rescale every earlier
component at every block: per-head, per-neuron and bias decompositions are refused there.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

from ..architectures import require_causal_lm
from ..config import BridgeConfig
from ..hooks import layer_hook_names
from .names import act_name
from .slicing import take


def require_pre_ln(cache, what: str) -> None:
    """Decompositions read the residual stream as a sum of the embeddings and the blocks' outputs,
    normalised only where a block reads it: true of pre-LN causal LMs, not of BERT's post-LN stream."""
    require_causal_lm(cache.cfg, what, "its LayerNorms rewrite the residual stream after every sublayer, so it is no sum of components")


def _centred(cfg: BridgeConfig) -> bool:
    """Whether the family's norms centre (LayerNorm) before scaling; RMSNorm does not."""
    return cfg.normalization_type == "LN"


def output_norm(cache, layer: int, sublayer: str) -> str | None:
    """The TL name prefix ("blocks.0.ln1_post.") of the norm on block ``layer``'s attention
    ("attn") or MLP ("mlp") output, or None. Refuses norms on the residual sums."""
    cfg = cache.cfg
    if cfg.norm_placement == "post_residual":
        raise ValueError(
            f"{cfg.original_architecture}'s norms apply to the residual sums (post-LN): the stream is not a sum of "
            "per-head, per-neuron or bias components; use the cached activations"
        )
    names = layer_hook_names(cfg, layer)
    scale_name = names.ln1_post_scale if sublayer == "attn" else names.ln2_post_scale
    return None if scale_name is None else scale_name[: -len("hook_scale")]


def output_norm_weight(cache, tl: Mapping[str, Tensor], layer: int, sublayer: str, x: Tensor) -> Tensor:
    """x [..., d_model] (rows before block ``layer``'s attention or MLP output norm) centred
    (LayerNorm) and times the norm's weight: the norm's linear part, without its scale or bias.
    x itself where the sublayer has no output norm."""
    prefix = output_norm(cache, layer, sublayer)
    if prefix is None:
        return x
    if _centred(cache.cfg):
        x = x - x.mean(-1, keepdim=True)
    weight = tl.get(prefix + "w")
    return x if weight is None else x * weight.to(x.dtype)


def output_norm_scale(cache, layer: int, sublayer: str, pos_slice=None) -> Tensor | None:
    """The cached hook_scale of block ``layer``'s attention or MLP output norm, pos-sliced:
    [*batch, pos, 1]; None where there is no such norm."""
    prefix = output_norm(cache, layer, sublayer)
    return None if prefix is None else take(cache[prefix + "hook_scale"], pos_slice, -2)


def through_output_norm(cache, tl: Mapping[str, Tensor], layer: int, sublayer: str, x: Tensor, pos_slice=None, component_dim: bool = True) -> Tensor:
    """x: contributions to block ``layer``'s attention or MLP output before its output norm,
    [*batch_and_pos, (component,) d_model] -> their contributions after it, the norm's scale
    frozen at its cached value (its bias is not included). x itself without an output norm."""
    scale = output_norm_scale(cache, layer, sublayer, pos_slice)
    if scale is None:
        return x
    x = output_norm_weight(cache, tl, layer, sublayer, x)
    return x / (scale[..., None] if component_dim else scale)


def final_layer(cache, layer: int | None) -> int:
    """TL's convention: None or -1 mean n_layers (the input to the unembedding)."""
    return cache.cfg.n_layers if layer is None or layer == -1 else layer


def labelled(components: Tensor, labels: list[str], return_labels: bool):
    return (components, labels) if return_labels else components


def empty_stack(cache, pos_slice, width: int | None = None) -> Tensor:
    """[0, *batch_and_pos, d_model (or width)]: the stack of no components."""
    like = take(cache["hook_embed"], pos_slice, -2)
    return like.new_zeros(0, *like.shape[:-1], like.shape[-1] if width is None else width)


def accumulated_resid(
    cache, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False, return_labels=False
):
    """The residual stream before each block up to ``layer`` ("{l}_pre"; "{l}_mid" too with
    incl_mid; "final_post" at n_layers): [n_components, *batch_and_pos, d_model]. apply_ln at
    the final layer applies ln_final with statistics recomputed per component (logit lens)."""
    layer = final_layer(cache, layer)
    n_layers = cache.cfg.n_layers
    parts, labels = [], []
    for l in range(layer + 1):
        if l == n_layers:
            parts.append(cache["resid_post", n_layers - 1])
            labels.append("final_post")
            continue
        parts.append(cache["resid_pre", l])
        labels.append(f"{l}_pre")
        if (incl_mid and l < layer) or (mlp_input and l == layer):
            parts.append(cache["resid_mid", l])
            labels.append(f"{l}_mid")
    components = torch.stack([take(part, pos_slice, -2) for part in parts])
    if apply_ln:
        components = apply_ln_to_stack(
            cache, components, layer, mlp_input=mlp_input, pos_slice=pos_slice,
            has_batch_dim=cache.has_batch_dim, recompute_ln=layer == n_layers,
        )  # fmt: skip
    return labelled(components, labels, return_labels)


def decompose_resid(
    cache, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True, return_labels=False
):
    """The residual stream into ``layer`` as the embeddings plus each block's attention and MLP
    outputs (mode "all", "attn" or "mlp"): [n_components, *batch_and_pos, d_model]."""
    require_pre_ln(cache, "decompose_resid")
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
    layer = final_layer(cache, layer)
    incl_attn, incl_mlp = mode != "mlp", mode != "attn"
    parts, labels = [], []
    if incl_embeds:
        if cache.has_embed:
            parts.append(cache["hook_embed"])
            labels.append("embed")
        if cache.has_pos_embed:
            parts.append(cache["hook_pos_embed"])
            labels.append("pos_embed")
    for l in range(layer):
        if incl_attn:
            parts.append(cache["attn_out", l])
            labels.append(f"{l}_attn_out")
        if incl_mlp:
            parts.append(cache["mlp_out", l])
            labels.append(f"{l}_mlp_out")
    if mlp_input and incl_attn:
        parts.append(cache["attn_out", layer])
        labels.append(f"{layer}_attn_out")
    if parts:
        components = torch.stack([take(part, pos_slice, -2) for part in parts])
    else:  # layer 0 without the embeddings (TL's torch.stack fails there)
        components = empty_stack(cache, pos_slice)
    if apply_ln:
        components = apply_ln_to_stack(cache, components, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return labelled(components, labels, return_labels)


def cached_ln_scale(cache, layer: int, mlp_input: bool, pos_slice=None, batch_slice=None) -> Tensor | None:
    """The hook_scale of the norm that reads the stream into ``layer`` (ln1, ln2 with mlp_input,
    ln_final at n_layers), pos-sliced, and batch-sliced when the cache has a batch dim:
    [*batch, pos, 1]. None where nothing normalises that input (OLMo 2's blocks, a model
    without a final norm): the block reads the stream itself."""
    cfg = cache.cfg
    if layer == cfg.n_layers:
        name = "ln_final.hook_scale" if cfg.final_norm else None
    else:  # the norm on block ``layer``'s attention (or MLP) input
        names = layer_hook_names(cfg, layer)
        name = names.ln2_scale if mlp_input else names.ln1_scale
    if name is None:
        return None
    if name not in cache:
        raise KeyError(f"apply_ln needs the cached LayerNorm scale {name!r}; run_with_cache without filtering it out")
    scale = take(cache[name], pos_slice, -2)
    return take(scale, batch_slice, 0) if cache.has_batch_dim else scale


def apply_ln_to_stack(
    cache, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None, has_batch_dim=True, recompute_ln=False
):
    """What each component of a stack contributes to the input of ``layer``'s ln1 (ln2 with
    mlp_input; ln_final at n_layers): centred (LayerNorm; RMSNorm does not centre) and divided
    by the scale cached in that norm's hook_scale, without the norm's weights. The scale belongs
    to the whole residual stream, which is why it is read from the cache. batch_slice slices the
    stack's dim 1 (when has_batch_dim) and the cached scale's batch dim.
    recompute_ln at the final layer instead applies ln_final (weights included) with statistics
    of each component itself, as TransformerLens's logit lens does."""
    require_pre_ln(cache, "apply_ln_to_stack (apply_ln, logit_attrs)")
    cfg = cache.cfg
    layer = final_layer(cache, layer)
    if has_batch_dim:
        residual_stack = take(residual_stack, batch_slice, 1)
    if recompute_ln and layer == cfg.n_layers:
        return ln_final(cache.tl_weights(), cfg, residual_stack)
    scale = cached_ln_scale(cache, layer, mlp_input, pos_slice, batch_slice)
    if scale is None:  # nothing normalises that input: the stack as it reaches it
        return residual_stack
    if _centred(cfg):
        residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
    return residual_stack / scale


def ln_final(tl: Mapping[str, Tensor], cfg: BridgeConfig, x: Tensor) -> Tensor:
    """ln_final applied to each row of x with its own statistics and the norm's weights, in
    HookedTransformer's order of operations (16-bit inputs normalised in float32, as TL does);
    x itself for a model without a final norm."""
    if not cfg.final_norm:
        return x
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64):
        x = x.float()
    if _centred(cfg):
        x = x - x.mean(-1, keepdim=True)
    x = (x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()).to(dtype)
    x = x * tl["ln_final.w"]
    return x + tl["ln_final.b"] if "ln_final.b" in tl else x


def accumulated_bias(
    tl: Mapping[str, Tensor], cfg: BridgeConfig, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
) -> Tensor:
    """[d_model]: the b_O (and b_out) of every block before ``layer`` (plus block ``layer``'s b_O
    with mlp_input), added in HookedTransformer.accumulated_bias's order, in at least float32
    (TL always sums in float32, also for a float64 model). A missing bias contributes zero."""
    W_E = tl["embed.W_E"]
    total = W_E.new_zeros(cfg.d_model, dtype=torch.promote_types(W_E.dtype, torch.float32))
    names = []
    for l in range(layer):
        names.append(f"blocks.{l}.attn.b_O")
        if include_mlp_biases:
            names.append(f"blocks.{l}.mlp.b_out")
    if mlp_input:
        if layer >= cfg.n_layers:
            raise ValueError(f"mlp_input: there is no MLP after the final block (layer={layer})")
        names.append(f"blocks.{layer}.attn.b_O")
    for name in names:
        if name in tl:
            total = total + tl[name]
    return total


def stream_bias(cache, layer: int, mlp_input: bool, include_mlp_biases: bool, pos_slice=None) -> Tensor:
    """accumulated_bias as it reaches the stream: [d_model], or [*batch_and_pos, d_model] where
    output norms scale the biases per position (their own biases included)."""
    tl, cfg = cache.tl_weights(), cache.cfg
    if cfg.norm_placement not in ("pre_post", "output"):
        if cfg.norm_placement == "post_residual":
            output_norm(cache, 0, "attn")  # refuses
        return accumulated_bias(tl, cfg, layer, mlp_input, include_mlp_biases)
    if mlp_input and layer >= cfg.n_layers:
        raise ValueError(f"mlp_input: there is no MLP after the final block (layer={layer})")
    parts = []
    for l in range(layer):
        parts.append((l, "attn", f"blocks.{l}.attn.b_O"))
        if include_mlp_biases:
            parts.append((l, "mlp", f"blocks.{l}.mlp.b_out"))
    if mlp_input:
        parts.append((layer, "attn", f"blocks.{layer}.attn.b_O"))
    W_E = tl["embed.W_E"]
    total = W_E.new_zeros(cfg.d_model, dtype=torch.promote_types(W_E.dtype, torch.float32))
    for l, sublayer, name in parts:
        bias = tl[name].to(total.dtype) if name in tl else None
        prefix = output_norm(cache, l, sublayer)
        if prefix is None:  # no norm on this output: its bias as it is
            total = total if bias is None else total + bias
            continue
        if bias is not None:
            total = total + through_output_norm(cache, tl, l, sublayer, bias, pos_slice, component_dim=False)
        if prefix + "b" in tl:
            total = total + tl[prefix + "b"].to(total.dtype)
    return total


def residual_unembed(tl: Mapping[str, Tensor]) -> Tensor:
    """[d_model, d_vocab_out]: what reads the residual stream into the vocabulary. W_U, or
    project_out.W @ W_U behind OPT's project_out (W_U is then [d_embed, d_vocab_out])."""
    W_U = tl["unembed.W_U"]
    return tl["project_out.W"] @ W_U if "project_out.W" in tl else W_U


def residual_embed(tl: Mapping[str, Tensor]) -> Tensor:
    """[d_vocab, d_model]: each token's embedding as it enters the residual stream. W_E, or
    W_E @ project_in.W behind OPT's project_in (W_E is then [d_vocab, d_embed])."""
    W_E = tl["embed.W_E"]
    return W_E @ tl["project_in.W"] if "project_in.W" in tl else W_E


def tokens_to_residual_directions(tl: Mapping[str, Tensor], tokens, to_single_token: Callable | None = None) -> Tensor:
    """The unembedding column of each token, as HookedTransformer.tokens_to_residual_directions:
    [d_model] for one token (an int, a one-element tensor, or a string when ``to_single_token``
    is given), [*tokens.shape, d_model] for a tensor of several. Through OPT's project_out where
    the model has one (residual_unembed)."""
    W_U = residual_unembed(tl)  # [d_model, d_vocab_out]
    if isinstance(tokens, Tensor) and tokens.numel() > 1:
        return W_U[:, tokens].movedim(0, -1)
    if isinstance(tokens, str):
        if to_single_token is None:
            raise TypeError(f"tokens {tokens!r} is a string, and this model has no tokenizer: pass token ids")
        tokens = to_single_token(tokens)
    elif isinstance(tokens, Tensor):
        tokens = int(tokens.item())
    if not isinstance(tokens, int):
        raise TypeError(f"tokens must be an int, a string or a tensor of token ids, got {type(tokens).__name__}")
    return W_U[:, tokens]


def logit_attrs(
    cache, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None, has_batch_dim=True
):
    """Each component's direct contribution to the logit of ``tokens`` (minus that of
    ``incorrect_tokens``): the final-LN-scaled stack dotted with W_U's columns,
    [n_components, *batch_and_pos]."""
    tl = cache.tl_weights()
    to_single_token = getattr(cache.model, "to_single_token", None)
    directions = tokens_to_residual_directions(tl, tokens, to_single_token)
    if incorrect_tokens is not None:
        if _token_shape(tokens) != _token_shape(incorrect_tokens):
            raise ValueError(
                f"tokens and incorrect_tokens must have the same shape, got "
                f"{_token_shape(tokens)} and {_token_shape(incorrect_tokens)}"
            )
        directions = directions - tokens_to_residual_directions(tl, incorrect_tokens, to_single_token)
    scaled = apply_ln_to_stack(
        cache, residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
    )
    return (scaled * directions).sum(-1)


def _token_shape(tokens) -> tuple[int, ...]:
    return tuple(tokens.shape) if isinstance(tokens, Tensor) else ()


def stack_activation(cache, activation_name: str, layer=-1, sublayer_type: str | None = None) -> Tensor:
    """One activation of every block before ``layer``, stacked: [layer, ...]."""
    layer = final_layer(cache, layer)
    return torch.stack([cache[act_name(activation_name, l, sublayer_type)] for l in range(layer)])
