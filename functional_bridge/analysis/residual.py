"""Residual-stream decompositions over a cache: TransformerLens's ActivationCache analyses.

Pure functions of an ActivationCache (activations, and a model whose leaves give the weights at
call time); ActivationCache exposes them as methods. Options, labels, shapes and values are
TransformerLens 3.9's. A stack is [component, *batch_and_pos, d_model]; ``layer`` counts the
blocks whose outputs are included (None or -1: all, i.e. the input to the unembedding).
Per-head and per-neuron outputs are computed from hook_z / hook_post and the current W_O / W_out,
without a second forward pass. Where a norm sits on the attention or MLP output (Gemma 2/3's
ln1_post/ln2_post, OLMo 2's), each head's and neuron's output is taken through it with the
norm's scale frozen at its cached value (the norm is linear once its scale is fixed), so the
components still sum to the residual stream; TransformerLens 3.9 leaves them out, and its
per-head results do not sum there. Norms on the residual sums (OPT's post-LN) rescale every
earlier component at every block: those decompositions are refused.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..config import BridgeConfig
from ..hooks import layer_hook_names
from .circuits import head_weight
from .names import act_name
from .slicing import selected_indices, take

CENTRED_NORMS = ("LN", "LNPre")
NORMS = ("LN", "LNPre", "RMS", "RMSPre")


def _final(cache, layer: int | None) -> int:
    n_layers = cache.cfg.n_layers
    return n_layers if layer is None or layer == -1 else layer


def _labelled(components: Tensor, labels: list[str], return_labels: bool):
    return (components, labels) if return_labels else components


def _empty_stack(cache, pos_slice) -> Tensor:
    """[0, *batch_and_pos, d_model]: the stack of no components."""
    like = take(cache["hook_embed"], pos_slice, -2)
    return like.new_zeros(0, *like.shape)


def accumulated_resid(
    cache, layer=None, incl_mid=False, apply_ln=False, pos_slice=None, mlp_input=False, return_labels=False
):
    """The residual stream before each block up to ``layer`` ("{l}_pre"; "{l}_mid" too with
    incl_mid; "final_post" at n_layers): [n_components, *batch_and_pos, d_model]. apply_ln at
    the final layer applies ln_final with statistics recomputed per component (logit lens)."""
    layer = _final(cache, layer)
    n_layers = cache.cfg.n_layers
    parts, labels = [], []
    for l in range(layer + 1):
        if l == n_layers:
            parts.append(cache[f"blocks.{n_layers - 1}.hook_resid_post"])
            labels.append("final_post")
            continue
        parts.append(cache[f"blocks.{l}.hook_resid_pre"])
        labels.append(f"{l}_pre")
        if (incl_mid and l < layer) or (mlp_input and l == layer):
            parts.append(cache[f"blocks.{l}.hook_resid_mid"])
            labels.append(f"{l}_mid")
    components = torch.stack([take(part, pos_slice, -2) for part in parts])
    if apply_ln:
        components = apply_ln_to_stack(
            cache, components, layer, mlp_input=mlp_input, pos_slice=pos_slice,
            has_batch_dim=cache.has_batch_dim, recompute_ln=layer == n_layers,
        )  # fmt: skip
    return _labelled(components, labels, return_labels)


def decompose_resid(
    cache, layer=None, mlp_input=False, mode="all", apply_ln=False, pos_slice=None, incl_embeds=True, return_labels=False
):
    """The residual stream into ``layer`` as the embeddings plus each block's attention and MLP
    outputs (mode "all", "attn" or "mlp"): [n_components, *batch_and_pos, d_model]."""
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
    layer = _final(cache, layer)
    incl_attn, incl_mlp = mode != "mlp", mode != "attn" and not getattr(cache.cfg, "attn_only", False)
    parts, labels = [], []
    if incl_embeds:
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in cache:
                parts.append(cache[name])
                labels.append(label)
    for l in range(layer):
        if incl_attn:
            parts.append(cache[f"blocks.{l}.hook_attn_out"])
            labels.append(f"{l}_attn_out")
        if incl_mlp:
            parts.append(cache[f"blocks.{l}.hook_mlp_out"])
            labels.append(f"{l}_mlp_out")
    if mlp_input and incl_attn:
        parts.append(cache[f"blocks.{layer}.hook_attn_out"])
        labels.append(f"{layer}_attn_out")
    components = torch.stack([take(part, pos_slice, -2) for part in parts])
    if apply_ln:
        components = apply_ln_to_stack(cache, components, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return _labelled(components, labels, return_labels)


def _output_norm(cache, layer: int, sublayer: str) -> str | None:
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


def through_output_norm(cache, tl: Mapping[str, Tensor], layer: int, sublayer: str, x: Tensor, pos_slice=None, component_dim: bool = True) -> Tensor:
    """x: contributions to block ``layer``'s attention or MLP output before its output norm,
    [*batch_and_pos, (component,) d_model] -> their contributions after it, the norm's scale
    frozen at its cached value (centred first for a LayerNorm; its bias is not included). x
    itself where the sublayer has no output norm."""
    prefix = _output_norm(cache, layer, sublayer)
    if prefix is None:
        return x
    if cache.cfg.normalization_type in CENTRED_NORMS:
        x = x - x.mean(-1, keepdim=True)
    scale = take(cache[prefix + "hook_scale"], pos_slice, -2)  # [*batch, pos, 1]
    weight = tl.get(prefix + "w")
    x = x / (scale[..., None] if component_dim else scale)
    return x if weight is None else x * weight.to(x.dtype)


def _output_norm_bias(cache, tl: Mapping[str, Tensor], layer: int, sublayer: str, bias: Tensor | None, pos_slice) -> Tensor | None:
    """What a sublayer's output bias (b_O, b_out) and its output norm's own bias add to the
    stream: [*batch_and_pos, d_model], or [d_model] without an output norm."""
    prefix = _output_norm(cache, layer, sublayer)
    if prefix is None:
        return bias
    like = take(cache[prefix + "hook_scale"], pos_slice, -2)
    total = like.new_zeros(*like.shape[:-1], cache.cfg.d_model)
    if bias is not None:
        total = total + through_output_norm(cache, tl, layer, sublayer, bias.to(total.dtype), pos_slice, component_dim=False)
    norm_bias = tl.get(prefix + "b")
    return total if norm_bias is None else total + norm_bias.to(total.dtype)


def head_results(cache, layer: int, tl: Mapping[str, Tensor] | None = None) -> Tensor:
    """Each head's output in block ``layer``: hook_z @ W_O per head (through the attention's
    output norm, if any), [*batch, pos, head, d_model]. Summed over heads plus b_O (normed
    likewise) it is hook_attn_out."""
    tl = cache.tl_weights() if tl is None else tl
    W_O = head_weight(tl, cache.cfg, layer, "W_O")  # [head, d_head, d_model]
    z = cache[f"blocks.{layer}.attn.hook_z"]  # [*batch, pos, head, d_head]
    return through_output_norm(cache, tl, layer, "attn", torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype)))


def stack_head_results(cache, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False):
    """Every head's output in the blocks before ``layer`` ("L{l}H{h}", layer-major):
    [layer * n_heads (+1 remainder), *batch_and_pos, d_model]."""
    layer = _final(cache, layer)
    tl = cache.tl_weights()
    labels = [f"L{l}H{h}" for l in range(layer) for h in range(cache.cfg.n_heads)]
    if layer > 0:
        per_layer = [take(head_results(cache, l, tl), pos_slice, -3) for l in range(layer)]
        components = torch.cat(per_layer, dim=-2).movedim(-2, 0)  # [layer * head, ..., d_model]
    else:
        components = _empty_stack(cache, pos_slice)
    return _finish_stack(cache, components, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)


def neuron_results(cache, layer: int, neuron_slice=None, pos_slice=None, tl: Mapping[str, Tensor] | None = None) -> Tensor:
    """Each neuron's output in block ``layer``: hook_post[n] * W_out[n] (through the MLP's output
    norm, if any), [*batch_and_pos, d_mlp, d_model]. Refused for a mixture of experts, whose
    neurons belong to experts weighted per token by the router (use the MLP's output whole)."""
    if cache.cfg.num_experts is not None:
        raise ValueError(
            f"{cache.cfg.original_architecture}'s MLPs are mixtures of experts: per-neuron results are not supported "
            "(decompose with expand_neurons=False)"
        )
    tl = cache.tl_weights() if tl is None else tl
    post = take(cache[f"blocks.{layer}.mlp.hook_post"], pos_slice, -2)  # [..., d_mlp]
    W_out = tl[f"blocks.{layer}.mlp.W_out"]  # [d_mlp, d_model]
    out = take(post, neuron_slice, -1)[..., None] * take(W_out, neuron_slice, 0).to(post.dtype)
    return through_output_norm(cache, tl, layer, "mlp", out, pos_slice)


def stack_neuron_results(
    cache, layer, pos_slice=None, neuron_slice=None, return_labels=False, incl_remainder=False, apply_ln=False
):
    """Every neuron's output in the blocks before ``layer`` ("L{l}N{n}", layer-major):
    [layer * n_neurons (+1 remainder), *batch_and_pos, d_model]."""
    layer = _final(cache, layer)
    tl = cache.tl_weights()
    neurons = selected_indices(neuron_slice, cache.cfg.d_mlp)
    labels = [f"L{l}N{n}" for l in range(layer) for n in neurons]
    if layer > 0:
        per_layer = [neuron_results(cache, l, neuron_slice, pos_slice, tl) for l in range(layer)]
        if isinstance(neuron_slice, int):  # one neuron: give it its dim back
            per_layer = [part[..., None, :] for part in per_layer]
        components = torch.cat(per_layer, dim=-2).movedim(-2, 0)
    else:
        components = _empty_stack(cache, pos_slice)
    return _finish_stack(cache, components, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)


def _finish_stack(cache, components, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels):
    """The end of the stack_* functions: append what the components leave of resid_post of block
    ``layer - 1`` ("remainder"), apply the norm that reads block ``layer``'s input if asked, label."""
    if incl_remainder:
        resid = take(cache["resid_post", layer - 1], pos_slice, -2)
        components = torch.cat([components, (resid - components.sum(0))[None]])
        labels = [*labels, "remainder"]
    if apply_ln:
        components = apply_ln_to_stack(cache, components, layer, pos_slice=pos_slice)
    return _labelled(components, labels, return_labels)


def accumulated_bias(
    tl: Mapping[str, Tensor], cfg: BridgeConfig, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
) -> Tensor:
    """[d_model]: the b_O (and b_out) of every block before ``layer`` (plus block ``layer``'s b_O
    with mlp_input). A family without a bias contributes zero."""
    total = tl["embed.W_E"].new_zeros(cfg.d_model)
    names = [(l, "attn.b_O") for l in range(layer)]
    names += [(l, "mlp.b_out") for l in range(layer)] if include_mlp_biases else []
    if mlp_input:
        if layer >= cfg.n_layers:
            raise ValueError("mlp_input: there is no MLP after the final block")
        names.append((layer, "attn.b_O"))
    for l, name in names:
        bias = tl.get(f"blocks.{l}.{name}")
        if bias is not None:
            total = total + bias
    return total


def get_full_resid_decomposition(
    cache, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False, pos_slice=None, return_labels=False
):
    """The residual stream into ``layer`` as every head, every neuron (or MLP, expand_neurons=
    False), the embeddings and the summed biases ("bias"): [n_components, *batch_and_pos, d_model]."""
    layer = _final(cache, layer)
    heads, labels = stack_head_results(cache, layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True)
    components = [heads]
    if layer > 0 and not getattr(cache.cfg, "attn_only", False):
        if expand_neurons:
            mlps, mlp_labels = stack_neuron_results(cache, layer, pos_slice=pos_slice, return_labels=True)
        else:
            mlps, mlp_labels = decompose_resid(
                cache, layer, mlp_input=mlp_input, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
            )
        components.append(mlps)
        labels = labels + mlp_labels
    for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
        if name in cache:
            components.append(take(cache[name], pos_slice, -2)[None])
            labels.append(label)
    bias = _stream_bias(cache, layer, mlp_input, expand_neurons, pos_slice)
    components.append(bias.to(heads.dtype).expand(1, *heads.shape[1:]))
    labels.append("bias")
    stack = torch.cat(components)
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return _labelled(stack, labels, return_labels)


def _stream_bias(cache, layer: int, mlp_input: bool, include_mlp_biases: bool, pos_slice) -> Tensor:
    """accumulated_bias as it reaches the stream: [d_model], or [*batch_and_pos, d_model] where
    output norms scale the biases per position."""
    tl, cfg = cache.tl_weights(), cache.cfg
    if cfg.norm_placement not in ("pre_post", "output"):
        return accumulated_bias(tl, cfg, layer, mlp_input, include_mlp_biases)
    parts = [(l, "attn", "attn.b_O") for l in range(layer)] + [(layer, "attn", "attn.b_O")] * mlp_input
    parts += [(l, "mlp", "mlp.b_out") for l in range(layer)] if include_mlp_biases else []
    total = tl["embed.W_E"].new_zeros(cfg.d_model)
    for l, sublayer, name in parts:
        total = total + _output_norm_bias(cache, tl, l, sublayer, tl.get(f"blocks.{l}.{name}"), pos_slice)
    return total


def apply_ln_to_stack(
    cache, residual_stack, layer=None, mlp_input=False, pos_slice=None, batch_slice=None, has_batch_dim=True, recompute_ln=False
):
    """What each component of a stack contributes to the input of ``layer``'s ln1 (ln2 with
    mlp_input; ln_final at n_layers): centred (LayerNorm only; RMSNorm does not centre) and
    divided by the scale cached in that norm's hook_scale, without the norm's weights. The scale
    belongs to the whole residual stream, which is why it is read from the cache.
    recompute_ln at the final layer instead applies ln_final (weights included) with statistics
    of each component itself, as TransformerLens's logit lens does."""
    cfg = cache.cfg
    if cfg.normalization_type not in NORMS:
        return residual_stack
    layer = _final(cache, layer)
    if has_batch_dim:
        residual_stack = take(residual_stack, batch_slice, 1)
    if recompute_ln and layer == cfg.n_layers:
        return _ln_final(cache.tl_weights(), cfg, residual_stack)
    if layer == cfg.n_layers:
        name = "ln_final.hook_scale" if cfg.final_norm else None
    else:  # the norm on block ``layer``'s attention (or MLP) input
        names = layer_hook_names(cfg, layer)
        name = names.ln2_scale if mlp_input else names.ln1_scale
    if name is None:  # nothing normalises that input (OLMo 2, OPT's post-LN): it reads the stream
        return residual_stack
    if cfg.normalization_type in CENTRED_NORMS:
        residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
    if name not in cache:
        raise KeyError(f"apply_ln needs the cached LayerNorm scale {name!r}; run_with_cache without filtering it out")
    scale = take(cache[name], pos_slice, -2)  # [*batch, pos, 1], sliced
    if cache.has_batch_dim:
        scale = take(scale, batch_slice, 0)
    return residual_stack / scale


def _ln_final(tl: Mapping[str, Tensor], cfg: BridgeConfig, x: Tensor) -> Tensor:
    """ln_final applied to each row of x with its own statistics (and the norm's weights)."""
    if cfg.normalization_type in CENTRED_NORMS:
        x = x - x.mean(-1, keepdim=True)
    x = x / (x.pow(2).mean(-1, keepdim=True) + cfg.eps).sqrt()
    if "ln_final.w" in tl:
        x = x * tl["ln_final.w"]
    if "ln_final.b" in tl:
        x = x + tl["ln_final.b"]
    return x


def tokens_to_residual_directions(tl: Mapping[str, Tensor], tokens) -> Tensor:
    """The unembedding column of each token: [d_model] for one token, [*tokens.shape, d_model]
    for a tensor of several."""
    W_U = tl["unembed.W_U"]  # [d_model, d_vocab_out]
    if isinstance(tokens, str):
        raise TypeError("tokens must be token ids (an int or a tensor): this cache has no tokenizer")
    if isinstance(tokens, Tensor) and tokens.numel() > 1:
        return W_U[:, tokens].movedim(0, -1)
    if isinstance(tokens, Tensor):
        tokens = int(tokens.item())
    if not isinstance(tokens, int):
        raise TypeError(f"tokens must be an int or a tensor of token ids, got {type(tokens).__name__}")
    return W_U[:, tokens]


def logit_attrs(
    cache, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None, has_batch_dim=True
):
    """Each component's direct contribution to the logit of ``tokens`` (minus that of
    ``incorrect_tokens``): the final-LN-scaled stack dotted with W_U's columns,
    [n_components, *batch_and_pos]."""
    tl = cache.tl_weights()
    directions = tokens_to_residual_directions(tl, tokens)
    if incorrect_tokens is not None:
        if _token_shape(tokens) != _token_shape(incorrect_tokens):
            raise ValueError(
                f"tokens and incorrect_tokens must have the same shape, got "
                f"{_token_shape(tokens)} and {_token_shape(incorrect_tokens)}"
            )
        directions = directions - tokens_to_residual_directions(tl, incorrect_tokens)
    scaled = apply_ln_to_stack(
        cache, residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice, has_batch_dim=has_batch_dim
    )
    return (scaled * directions).sum(-1)


def _token_shape(tokens) -> tuple[int, ...]:
    return tuple(tokens.shape) if isinstance(tokens, Tensor) else ()


def stack_activation(cache, activation_name: str, layer=-1, sublayer_type: str | None = None) -> Tensor:
    """One activation of every block before ``layer``, stacked: [layer, ...]."""
    layer = _final(cache, layer)
    return torch.stack([cache[act_name(activation_name, l, sublayer_type)] for l in range(layer)])
