"""Activation patching as one vmapped call over a batch of "worlds".

Each world (variant) is the same forward with some activations replaced by their values from a
source run; which ones is data (a boolean mask per hook point and world), so vmap runs every
variant at once instead of a Python loop of hooked forwards. Attribution patching, the linear
approximation, uses activation gradients from ``func.activation_grads``.

Direction: the *target* run is patched with activations from the *source* run. The sweeps
below patch the corrupted run's activations into the clean run (noising); swap the two token
arguments to denoise.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor
from torch.func import vmap

from .config import BridgeConfig
from .func import activation_grads, detached
from .hooks import select_names
from .model import check_inputs, forward, run_with_cache
from .params import Params

Metric = Callable[[Tensor], Tensor]  # logits [batch, pos, vocab] -> scalar (or [batch]: one value per example)


def patch_worlds(
    params: Params,
    cfg: BridgeConfig,
    tokens: Tensor,
    source: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """metric for each world: [n_worlds].

    source: hook name -> the activation to patch in (the activation's shape).
    masks: hook name -> bool [n_worlds, *shape broadcastable to the activation]: where world w
    takes the source value. All masks share n_worlds."""
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    names = select_names(cfg, list(masks))
    worlds = {mask.shape[0] for mask in masks.values()}
    if len(worlds) != 1:
        raise ValueError(f"every mask needs the same leading number of worlds, got {sorted(worlds)}")
    params = detached(params)
    source = {name: source[name].detach() for name in names}

    def one_world(world_masks: dict[str, Tensor]) -> Tensor:
        def patch(x: Tensor, hook) -> Tensor:
            return torch.where(world_masks[hook.name], source[hook.name], x)

        logits = forward(params, tokens, cfg, attention_mask=attention_mask, hooks=[(name, patch) for name in names])
        return metric(logits)

    with torch.no_grad():
        return vmap(one_world, chunk_size=chunk_size)(dict(masks))


def _one_hot_worlds(n_layers: int, n_items: int, item_shape: Callable[[int], tuple]) -> dict[int, Tensor]:
    """For world w = (layer l, item i): per layer a bool mask [n_worlds, *item_shape(n_items)]
    that is True only at item i of layer l."""
    n_worlds = n_layers * n_items
    world_layer = torch.arange(n_worlds) // n_items
    world_item = torch.arange(n_worlds) % n_items
    masks = {}
    for layer in range(n_layers):
        one_hot = (world_layer == layer)[:, None] & (world_item[:, None] == torch.arange(n_items))  # [worlds, items]
        masks[layer] = one_hot.view(n_worlds, *item_shape(n_items))
    return masks


def _layer_item_sweep(
    params, cfg, clean_tokens, corrupted_tokens, metric, hook: str, n_items: int, item_shape, attention_mask, chunk_size
) -> Tensor:
    """[n_layers, n_items]: the clean run with item i of blocks.{l}.{hook} taken from the
    corrupted run, one world per (l, i), all in one vmapped call. A metric returning [batch]
    (one value per example) gives [n_layers, n_items, batch]."""
    if corrupted_tokens.shape != clean_tokens.shape:
        raise ValueError(
            f"patching needs clean and corrupted tokens of one shape, got "
            f"{tuple(clean_tokens.shape)} and {tuple(corrupted_tokens.shape)}"
        )
    names = [f"blocks.{layer}.{hook}" for layer in range(cfg.n_layers)]
    with torch.no_grad():
        _, corrupted = run_with_cache(params, corrupted_tokens, cfg, names_filter=names, attention_mask=attention_mask)
    one_hot = _one_hot_worlds(cfg.n_layers, n_items, item_shape)
    masks = {name: one_hot[layer].to(clean_tokens.device) for layer, name in enumerate(names)}
    scores = patch_worlds(
        params, cfg, clean_tokens, corrupted, masks, metric, attention_mask=attention_mask, chunk_size=chunk_size
    )
    return scores.unflatten(0, (cfg.n_layers, n_items))


def head_z_patching(
    params: Params,
    cfg: BridgeConfig,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """[n_layers, n_heads]: metric of the clean run with head (l, h)'s hook_z, at every
    position, taken from the corrupted run (same shape as the clean run)."""
    return _layer_item_sweep(
        params, cfg, clean_tokens, corrupted_tokens, metric, "attn.hook_z", cfg.n_heads,
        lambda n: (1, 1, n, 1), attention_mask, chunk_size,  # z: [batch, pos, head, d_head]
    )  # fmt: skip


def resid_pre_patching(
    params: Params,
    cfg: BridgeConfig,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """[n_layers, pos]: metric of the clean run with blocks.l.hook_resid_pre at position p taken
    from the corrupted run (same shape as the clean run)."""
    return _layer_item_sweep(
        params, cfg, clean_tokens, corrupted_tokens, metric, "hook_resid_pre", clean_tokens.shape[-1],
        lambda n: (1, n, 1), attention_mask, chunk_size,  # resid: [batch, pos, d_model]
    )  # fmt: skip


def _attribution(params, cfg, clean_tokens, corrupted_tokens, metric, names, attention_mask):
    """Per name: (corrupted - clean activation) * d metric / d clean activation, elementwise."""
    grads = activation_grads(params, clean_tokens, cfg, metric, names, attention_mask=attention_mask)
    with torch.no_grad():
        _, clean = run_with_cache(params, clean_tokens, cfg, names_filter=names, attention_mask=attention_mask)
        _, corrupted = run_with_cache(params, corrupted_tokens, cfg, names_filter=names, attention_mask=attention_mask)
    return {name: (corrupted[name] - clean[name]) * grads[name] for name in names}


def head_z_attribution(
    params: Params, cfg: BridgeConfig, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric,
    *, attention_mask: Tensor | None = None, per_example: bool = False,
) -> Tensor:  # fmt: skip
    """[n_layers, n_heads]: attribution patching's linear estimate of head_z_patching minus the
    clean metric, from one forward and one backward pass. per_example=True: [batch, n_layers,
    n_heads], each example's terms (they sum to the whole; with a metric that is a sum over
    examples, example b's row is its own metric's estimate, the examples being independent)."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]
    terms = _attribution(params, cfg, clean_tokens, corrupted_tokens, metric, names, attention_mask)
    if per_example:
        return torch.stack([terms[name].sum(dim=(1, 3)) for name in names], dim=1)
    return torch.stack([terms[name].sum(dim=(0, 1, 3)) for name in names])  # z: [batch, pos, head, d_head]


def resid_pre_attribution(
    params: Params, cfg: BridgeConfig, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric,
    *, attention_mask: Tensor | None = None, per_example: bool = False,
) -> Tensor:  # fmt: skip
    """[n_layers, pos]: attribution patching's linear estimate of resid_pre_patching minus the
    clean metric. per_example=True: [batch, n_layers, pos], as head_z_attribution's."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)]
    terms = _attribution(params, cfg, clean_tokens, corrupted_tokens, metric, names, attention_mask)
    if per_example:
        return torch.stack([terms[name].sum(dim=2) for name in names], dim=1)
    return torch.stack([terms[name].sum(dim=(0, 2)) for name in names])  # resid: [batch, pos, d_model]
