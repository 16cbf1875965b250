"""Per-chunk functions for data-parallel analysis: each returns ``fn(*chunk_tensors)`` for
``map_dataset`` / ``resumable_map_dataset``, built on the one-process workflows (run_with_cache,
func.per_example_grads, patching's sweeps) rather than rewriting them. Each result leads with the
chunk's rows, so gathering puts the dataset's examples back in order.

    fn = dp.cached_activations(params, cfg, ["blocks.1.hook_resid_post"], reduce=dp.last_token)
    cache = dp.map_dataset(fn, (tokens, attention_mask), chunk_size=16)  # rank 0: name -> [n, d_model]
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import patching
from ..config import BridgeConfig
from ..func import LossFn, per_example_grads
from ..hooks import NameOrFilter
from ..model import run_with_cache
from ..params import Params

Reduce = Callable[[Tensor, "Tensor | None"], Tensor]  # (activation [batch, pos, ...], mask [batch, pos] or None) -> [batch, ...]


def last_token(activation: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[batch, pos, ...] -> [batch, ...]: each row's activation at its last real token (right or
    no padding; with left padding that is the last position)."""
    if attention_mask is None:
        return activation[:, -1]
    real = attention_mask.bool()
    positions = torch.arange(real.shape[1], device=real.device)
    last = torch.where(real, positions, -1).amax(dim=1).clamp(min=0)  # [batch]
    return activation[torch.arange(activation.shape[0], device=activation.device), last.to(activation.device)]


def mean_over_tokens(activation: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[batch, pos, ...] -> [batch, ...]: the mean over each row's real tokens."""
    if attention_mask is None:
        return activation.mean(dim=1)
    weights = attention_mask.to(activation.dtype).reshape(*attention_mask.shape, *[1] * (activation.dim() - 2))
    return (activation * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def cached_activations(
    params: Params, cfg: BridgeConfig, names_filter: NameOrFilter | Sequence[str], reduce: Reduce | None = None
) -> Callable[..., dict[str, Tensor]]:
    """fn(tokens [rows, pos], attention_mask=None) -> {hook name: activation [rows, ...]}: run_with_cache
    keeping only the hooks names_filter selects, detached, without grad, each reduced by
    ``reduce(activation, mask)`` (e.g. last_token, mean_over_tokens) so that only what is asked
    for is kept and sent."""

    def fn(tokens: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        with torch.no_grad():
            _, cache = run_with_cache(params, tokens, cfg, names_filter=names_filter, attention_mask=attention_mask, detach=True)
        return cache if reduce is None else {name: reduce(value, attention_mask) for name, value in cache.items()}

    return fn


def example_grads(params: Params, cfg: BridgeConfig, loss_fn: LossFn | None = None, vmap_chunk_size: int | None = None) -> Callable[..., dict[str, Tensor]]:
    """fn(tokens [rows, pos], attention_mask=None) -> {HF name: gradient [rows, *leaf shape]}: each
    example's gradient (func.per_example_grads; the default loss is next-token prediction)."""

    def fn(tokens: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        return per_example_grads(params, cfg, tokens, attention_mask, loss_fn, vmap_chunk_size)

    return fn


def patching_scores(
    params: Params, cfg: BridgeConfig, metric: Callable[..., Tensor], sweep: Callable = patching.head_z_patching
) -> Callable[..., Tensor]:
    """fn(clean [rows, pos], corrupted [rows, pos], attention_mask or None, *extras) -> [rows, n_layers,
    n_items]: a patching sweep of the patching module (head_z_patching, resid_pre_patching) per
    example. metric(logits [rows, pos, vocab], *extras) -> [rows]: one value per example, where
    extras are per-example tensors of the dataset (answer ids...)."""

    def fn(clean: Tensor, corrupted: Tensor, attention_mask: Tensor | None = None, *extras: Tensor) -> Tensor:
        scores = sweep(params, cfg, clean, corrupted, lambda logits: metric(logits, *extras), attention_mask=attention_mask)
        return scores.movedim(-1, 0)  # [n_layers, n_items, rows] -> [rows, n_layers, n_items]

    return fn


def attribution_scores(
    params: Params, cfg: BridgeConfig, metric: Callable[..., Tensor], sweep: Callable = patching.head_z_attribution
) -> Callable[..., Tensor]:
    """fn(clean, corrupted, attention_mask or None, *extras) -> [rows, n_layers, n_items]: attribution
    patching (head_z_attribution, resid_pre_attribution) per example, metric as patching_scores'
    (per example: the gradient is taken of their sum, each example's own since examples are
    independent)."""

    def fn(clean: Tensor, corrupted: Tensor, attention_mask: Tensor | None = None, *extras: Tensor) -> Tensor:
        total = lambda logits: metric(logits, *extras).sum()  # noqa: E731
        return sweep(params, cfg, clean, corrupted, total, attention_mask=attention_mask, per_example=True)

    return fn
