"""Per-head and per-neuron residual decompositions over a cache: TransformerLens 3.9's
compute_head_results, stack_head_results, get_neuron_results, stack_neuron_results and
get_full_resid_decomposition, with every TL option (project_output_onto included).

Head results are hook_z @ W_O per head and neuron results hook_post[n] * W_out[n], from the
weights of the model's leaves when called; no second forward pass. ``project_output_onto``
([d_model] or [d_model, n_outs]) is contracted with W_out before the per-neuron expansion, so
the [..., d_mlp, d_model] intermediate is never formed; with apply_ln the cached-scale norm is
folded in analytically, as TL does. Output norms (Gemma 2/3, OLMo 2) are taken through with
their cached scale (residual.py's output_norm_*), so heads and neurons still sum to the stream;
per-neuron results of a mixture of experts are refused.
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch
from torch import Tensor

from .circuits import head_weight
from .residual import (
    apply_ln_to_stack, cached_ln_scale, decompose_resid, empty_stack, final_layer, labelled, output_norm_scale,
    output_norm_weight, require_pre_ln, stream_bias, through_output_norm,
)  # fmt: skip
from .slicing import selected_indices, take, unwrapped


def head_results(cache, layer: int, tl: Mapping[str, Tensor] | None = None) -> Tensor:
    """Each head's output in block ``layer``, from hook_z and the current W_O (through the
    attention's output norm, if any): [*batch, pos, head, d_model]. Summed over heads plus b_O
    (normed likewise, plus the norm's bias) it is hook_attn_out."""
    tl = cache.tl_weights() if tl is None else tl
    z = cache["z", layer, "attn"]  # [*batch, pos, head, d_head]
    W_O = head_weight(tl, cache.cfg, layer, "W_O")  # [head, d_head, d_model]
    dtype = torch.promote_types(z.dtype, W_O.dtype)
    out = torch.einsum("...hd,hdm->...hm", z.to(dtype), W_O.to(device=z.device, dtype=dtype))
    return through_output_norm(cache, tl, layer, "attn", out)


def _result_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_result"


def _has_head_result(cache, layer: int) -> bool:
    """Whether blocks.{layer}.attn.hook_result holds per-head results shaped like hook_z's."""
    name = _result_name(layer)
    if name not in cache:
        return False
    z = cache["z", layer, "attn"]
    return cache[name].shape == (*z.shape[:-1], cache.cfg.d_model)


def compute_head_results(cache, *, warn_if_cached: bool = True) -> None:
    """Add blocks.{l}.attn.hook_result [*batch, pos, head, d_model] for every layer to the
    cache, as TL does (entries already holding per-head results are kept; misshapen ones are
    recomputed). They are activations like every other entry: computed once, from the W_O of
    the leaves now."""
    missing = [l for l in range(cache.cfg.n_layers) if not _has_head_result(cache, l)]
    if not missing:
        if warn_if_cached:
            logging.warning("Tried to compute head results when they were already cached")
        return
    tl = cache.tl_weights()
    results = {_result_name(l): head_results(cache, l, tl) for l in missing}  # all or nothing
    cache.cache_dict.update(results)


def stack_head_results(cache, layer=-1, return_labels=False, incl_remainder=False, pos_slice=None, apply_ln=False):
    """Every head's output in the blocks before ``layer`` ("L{l}H{h}", layer-major):
    [layer * n_heads (+1 "remainder"), *batch_and_pos, d_model]. Computes (and caches) the
    head results first, as TL does."""
    layer = final_layer(cache, layer)
    compute_head_results(cache, warn_if_cached=False)
    labels = [f"L{l}H{h}" for l in range(layer) for h in range(cache.cfg.n_heads)]
    if layer > 0:
        per_layer = [take(cache["result", l, "attn"], pos_slice, -3) for l in range(layer)]
        components = torch.cat(per_layer, dim=-2).movedim(-2, 0)  # [layer * head, ..., d_model]
    else:
        components = None
    components, labels = _with_remainder(cache, components, labels, layer, pos_slice, incl_remainder, None)
    if apply_ln:
        components = apply_ln_to_stack(cache, components, layer, pos_slice=pos_slice)
    return labelled(components, labels, return_labels)


def get_neuron_results(cache, layer: int, neuron_slice=None, pos_slice=None, project_output_onto=None, *, tl=None) -> Tensor:
    """Each neuron's output in block ``layer``: hook_post[n] * W_out[n], [*batch_and_pos,
    n_neurons, d_model]; with project_output_onto [d_model] (or [d_model, n_outs]) the output
    is projected first: [*batch_and_pos, n_neurons] (or [..., n_neurons, n_outs]). An int
    neuron_slice drops the n_neurons dim. Through the MLP's output norm, if any (its cached
    scale divides the activations, its linear part acts on W_out)."""
    _require_dense_mlp(cache)
    tl = cache.tl_weights() if tl is None else tl
    acts = _normed_acts(cache, layer, pos_slice, neuron_slice)  # [*batch_and_pos, n_neurons]
    W_out = _normed_W_out(cache, tl, layer, neuron_slice)  # [n_neurons, d_model]
    if project_output_onto is None:
        return acts[..., None] * W_out
    projected = W_out @ project_output_onto  # [n_neurons(, n_outs)]; no n_neurons for an int slice
    # by the projection's dims (TL tests the product's, which breaks for an int neuron_slice)
    return acts * projected if project_output_onto.ndim == 1 else acts[..., None] * projected


def _require_dense_mlp(cache) -> None:
    """Refuse per-neuron results for a mixture of experts: its neurons belong to experts the
    router weights per token."""
    if cache.cfg.num_experts is not None:
        raise ValueError(
            f"{cache.cfg.original_architecture}'s MLPs are mixtures of experts: per-neuron results are not supported "
            "(decompose with expand_neurons=False)"
        )


def _normed_acts(cache, layer: int, pos_slice, neuron_slice) -> Tensor:
    """hook_post of block ``layer``, pos- then neuron-sliced, divided by the MLP output norm's
    cached scale where there is one: [*batch_and_pos, n_neurons]."""
    acts = take(cache["post", layer, "mlp"], pos_slice, -2)  # [*batch_and_pos, d_mlp]
    scale = output_norm_scale(cache, layer, "mlp", pos_slice)  # [*batch_and_pos, 1]
    if scale is not None:  # before the neuron slice, which an int drops
        acts = acts / scale
    return take(acts, neuron_slice, -1)


def _normed_W_out(cache, tl, layer: int, neuron_slice) -> Tensor:
    """W_out's rows (neuron-sliced) through the MLP output norm's linear part: [n, d_model]."""
    return output_norm_weight(cache, tl, layer, "mlp", take(tl[f"blocks.{layer}.mlp.W_out"], neuron_slice, 0))


def stack_neuron_results(
    cache, layer, pos_slice=None, neuron_slice=None, return_labels=False, incl_remainder=False, apply_ln=False,
    project_output_onto=None,
):  # fmt: skip
    """Every neuron's output in the blocks before ``layer`` ("L{l}N{n}", layer-major):
    [layer * n_neurons (+1 "remainder"), *batch_and_pos, d_model] (or the projection's last
    dim; squeezed for a [d_model] projection). An int neuron_slice keeps its dim."""
    components, labels = _neuron_stack(
        cache, final_layer(cache, layer), pos_slice, neuron_slice, incl_remainder, apply_ln, project_output_onto
    )
    return labelled(components, labels, return_labels)


def _neuron_stack(cache, layer, pos_slice, neuron_slice, incl_remainder, apply_ln, project_output_onto, mlp_input=False):
    """stack_neuron_results, normalised (apply_ln) for the input of block ``layer``'s ln1, or its
    ln2 with mlp_input (what get_full_resid_decomposition needs: TL's folded path always uses
    ln1 there, unlike its other rows)."""
    _require_dense_mlp(cache)
    neuron_slice = unwrapped(neuron_slice)
    if isinstance(neuron_slice, int):
        neuron_slice = [neuron_slice]
    project, squeeze = _projection_2d(project_output_onto)
    labels = [f"L{l}N{n}" for l in range(layer) for n in selected_indices(neuron_slice, cache.cfg.d_mlp)]
    tl = cache.tl_weights()
    folded = apply_ln and project is not None
    if layer == 0:
        components = None
    elif folded:
        components = _neuron_stack_ln_projected(cache, tl, layer, pos_slice, neuron_slice, project, mlp_input)
    else:
        per_layer = [get_neuron_results(cache, l, neuron_slice, pos_slice, project, tl=tl) for l in range(layer)]
        components = torch.cat(per_layer, dim=-2).movedim(-2, 0)
    components, labels = _with_remainder(cache, components, labels, layer, pos_slice, incl_remainder, project, folded)
    if apply_ln and not folded:
        components = apply_ln_to_stack(cache, components, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return components.squeeze(-1) if squeeze else components, labels


def _projection_2d(project: Tensor | None) -> tuple[Tensor | None, bool]:
    """A [d_model] projection as [d_model, 1] (and that it must be squeezed back)."""
    if project is None:
        return None, False
    return (project.unsqueeze(-1), True) if project.ndim == 1 else (project, False)


def _neuron_stack_ln_projected(cache, tl, layer: int, pos_slice, neuron_slice, project: Tensor, mlp_input: bool) -> Tensor:
    """LN_s(a_n W_out[n]) @ p = (a_n / s) (W_out[n] @ p - mean(W_out[n]) sum(p)) per neuron, with
    s the cached scale into ``layer`` (RMSNorm drops the mean term; no norm there: a_n W_out[n]
    @ p), W_out and a_n taken through an MLP output norm first: [layer * n, ..., n_outs]."""
    scale = cached_ln_scale(cache, layer, mlp_input, pos_slice)  # [*batch_and_pos, 1] or None
    centred = scale is not None and cache.cfg.normalization_type == "LN"
    per_layer = []
    for l in range(layer):
        W_out = _normed_W_out(cache, tl, l, neuron_slice)  # [n, d_model]
        linear = W_out @ project  # [n, n_outs]
        if centred:
            linear = linear - W_out.mean(-1)[:, None] * project.sum(0)[None, :]
        acts = _normed_acts(cache, l, pos_slice, neuron_slice)  # [..., n]
        per_layer.append((acts if scale is None else acts / scale)[..., None] * linear)
    return torch.cat(per_layer, dim=-2).movedim(-2, 0)


def _with_remainder(cache, components, labels, layer, pos_slice, incl_remainder, project, ln_folded=False):
    """Append "remainder": what the components leave of the stream into ``layer`` (projected,
    and normalised when the components are); an empty stack where there are no components."""
    if incl_remainder:
        require_pre_ln(cache, "incl_remainder")
        stream = take(_stream_into(cache, layer), pos_slice, -2)
        if ln_folded:
            stream = apply_ln_to_stack(cache, stream[None], layer, pos_slice=pos_slice)[0]
        if project is not None:
            stream = stream @ project
        remainder = stream if components is None else stream - components.sum(0)
        components = remainder[None] if components is None else torch.cat([components, remainder[None]])
        return components, [*labels, "remainder"]
    if components is None:
        components = empty_stack(cache, pos_slice, None if project is None else project.shape[-1])
    return components, labels


def _stream_into(cache, layer: int) -> Tensor:
    """The residual stream into block ``layer``: resid_post of block layer - 1 (TL), or
    resid_pre of block 0 for layer 0 (TL reads the final resid_post there)."""
    return cache["resid_pre", 0] if layer == 0 else cache["resid_post", layer - 1]


def get_full_resid_decomposition(
    cache, layer=None, mlp_input=False, expand_neurons=True, apply_ln=False, pos_slice=None, return_labels=False,
    project_output_onto=None,
):  # fmt: skip
    """The residual stream into ``layer`` as every head, every neuron (or each MLP, with
    expand_neurons=False), the embeddings and the summed biases ("bias"):
    [n_components, *batch_and_pos, d_model] (or the projection's last dim; squeezed for a
    [d_model] projection). Each row sums to what it contributes; all rows sum to the stream.
    With apply_ln, mlp_input and a projection, the neurons are normalised by ln2's scale like
    every other row (TL 3.9 uses ln1's for them there)."""
    require_pre_ln(cache, "get_full_resid_decomposition")
    layer = final_layer(cache, layer)
    if mlp_input and layer >= cache.cfg.n_layers:
        raise ValueError(f"mlp_input: there is no MLP after the final block (layer={layer})")
    project, squeeze = _projection_2d(project_output_onto)
    folded = apply_ln and project is not None

    def finish(stack: Tensor) -> Tensor:  # normalise (when folded) then project
        if folded:
            stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return stack if project is None else stack @ project

    heads, labels = stack_head_results(cache, layer + (1 if mlp_input else 0), pos_slice=pos_slice, return_labels=True)
    heads = finish(heads)
    components = [heads]
    if layer > 0:
        if expand_neurons:
            mlps, mlp_labels = _neuron_stack(cache, layer, pos_slice, None, False, folded, project, mlp_input)
        else:
            mlps, mlp_labels = decompose_resid(
                cache, layer, mlp_input=mlp_input, mode="mlp", pos_slice=pos_slice, incl_embeds=False, return_labels=True
            )
            mlps = finish(mlps)
        components.append(mlps)
        labels = labels + mlp_labels
    for present, name in ((cache.has_embed, "embed"), (cache.has_pos_embed, "pos_embed")):
        if present:
            components.append(finish(take(cache[name], pos_slice, -2)[None]))
            labels.append(name)
    bias = stream_bias(cache, layer, mlp_input, expand_neurons, pos_slice)  # [d_model] or [*batch_and_pos, d_model]
    if folded:  # expanded to every position first, so the norm can centre it
        bias = finish(bias.expand(1, *heads.shape[1:-1], cache.cfg.d_model))
    else:
        bias = (bias if project is None else bias @ project).expand(1, *heads.shape[1:])
    components.append(bias)
    labels.append("bias")
    stack = torch.cat(components)
    if apply_ln and not folded:
        stack = apply_ln_to_stack(cache, stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
    return labelled(stack.squeeze(-1) if squeeze else stack, labels, return_labels)
