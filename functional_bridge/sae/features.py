"""Feature work as one vmapped call: K feature edits (ablation, steering) as a worlds axis, and
several SAEs of one config (a stacked pytree) spliced in at once. Each is the loop of hooked
forwards it replaces, run by torch.func.vmap (see fb.patching for the worlds idea)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

from ..config import BridgeConfig
from ..func import detached
from ..model import check_inputs
from ..params import Params
from .config import SAEConfig
from .params import SAEParams, check_sae_params
from .run import forward_with_saes
from .sae import SAE, as_sae

Metric = Callable[[Tensor], Tensor]  # logits [batch, pos, d_vocab] -> a tensor (often a scalar)


def edit_features(acts: Tensor, features: Tensor, values: Tensor, mode: str) -> Tensor:
    """acts [..., d_sae] with feature features[j] set to values[j] (mode "set"; ablation is
    "set" to 0) or increased by it ("add": steering); features, values: [n]."""
    one_hot = F.one_hot(features, acts.shape[-1]).to(acts.dtype)  # [n, d_sae]
    delta = values.to(acts.dtype) @ one_hot  # [d_sae]
    if mode == "add":
        return acts + delta
    if mode == "set":
        keep = 1 - one_hot.sum(0).clamp(max=1)  # [d_sae]
        return acts * keep + delta
    raise ValueError(f"mode must be 'set' or 'add', got {mode!r}")


def feature_sweep(
    params: Params, tokens: Tensor, cfg: BridgeConfig, sae, features: Tensor, metric: Metric, *,
    values: Tensor | float = 0.0, mode: str = "set", positions: Tensor | None = None, use_error_term: bool = True,
    attention_mask: Tensor | None = None, chunk_size: int | None = None,
) -> Tensor:  # fmt: skip
    """metric for each of K worlds [K, ...]: world k runs the model with the SAE spliced in and
    feature features[k] set to values[k] (default 0: ablation) or, with mode="add", increased by
    it (steering), at hook_sae_acts_post; positions: bool [batch, pos] where the edit applies
    (default everywhere). One vmapped call, equal to the Python loop over k."""
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    sae = as_sae(sae)
    features = torch.as_tensor(features, device=tokens.device).long()
    if features.dim() != 1:
        raise ValueError(f"features must be a 1-D tensor of feature indices, got shape {tuple(features.shape)}")
    if bool(((features < 0) | (features >= sae.cfg.d_sae)).any()):
        raise ValueError(f"feature indices must be in [0, {sae.cfg.d_sae}), got {features.tolist()}")
    values = torch.broadcast_to(torch.as_tensor(values, dtype=sae.dtype, device=tokens.device), features.shape)
    name = f"{sae.cfg.output_hook}.hook_sae_acts_post"
    params, sae = detached(params), SAE(detached(sae.params), sae.cfg)
    where = None if positions is None else positions.to(tokens.device)[..., None]  # [batch, pos, 1]

    def world(feature: Tensor, value: Tensor) -> Tensor:
        def edit(acts: Tensor, hook) -> Tensor:
            edited = edit_features(acts, feature[None], value[None], mode)
            return edited if where is None else torch.where(where, edited, acts)

        logits = forward_with_saes(params, tokens, cfg, [sae], use_error_term=use_error_term, hooks=[(name, edit)],
                                   attention_mask=attention_mask)  # fmt: skip
        return metric(logits)

    with torch.no_grad():
        return vmap(world, chunk_size=chunk_size)(features, values)


def stacked_forward(
    params: Params, tokens: Tensor, cfg: BridgeConfig, stacked: SAEParams, sae_cfg: SAEConfig, *,
    use_error_term: bool = False, metric: Metric | None = None, attention_mask: Tensor | None = None,
    chunk_size: int | None = None,
) -> Tensor:  # fmt: skip
    """N SAEs of one config (``stacked``: leaves with a leading [N] axis, params.stack) spliced in
    one at a time, in one vmapped call: metric(logits) per SAE, [N, ...] (default: the logits,
    [N, batch, pos, d_vocab])."""
    check_sae_params(stacked, sae_cfg, batch_dims=1)
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    params, metric = detached(params), metric or (lambda logits: logits)

    def one(sae_params: SAEParams) -> Tensor:
        sae = SAE(sae_params, sae_cfg)
        return metric(forward_with_saes(params, tokens, cfg, [sae], use_error_term=use_error_term, attention_mask=attention_mask))

    with torch.no_grad():
        return vmap(one, chunk_size=chunk_size)(detached(stacked))
