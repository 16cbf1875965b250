"""Activations for SAE training, streamed from a model: each batch of tokens (or texts, through
the Bridge's tokenizer) is run only as far as the hook needs (stop_at_layer), and the hook's
activations come out flat, one row per token: [n_tokens, d_in] (hook_z heads flattened, as
SAELens's ActivationsStore does). SAELens's own ActivationsStore can also draw from a Bridge
directly: it calls ``run_with_cache(names_filter=, stop_at_layer=, prepend_bos=)``,
``to_tokens``, ``W_E.device`` and ``cfg.device``, which the facade answers as HookedTransformer."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch
from torch import Tensor

from ..config import BridgeConfig
from ..model import run_with_cache
from ..params import Params


def stop_layer(hook_name: str) -> int | None:
    """The block count a forward needs to reach hook_name (SAELens's rule: blocks.L.* -> L + 1)."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) + 1 if match else None


def activations(params: Params, tokens: Tensor, cfg: BridgeConfig, hook_name: str, attention_mask: Tensor | None = None) -> Tensor:
    """[batch * pos, d] (padding rows dropped when attention_mask is given): the activation at
    hook_name, the forward stopped after the block that holds it."""
    with torch.no_grad():
        _, cache = run_with_cache(params, tokens, cfg, names_filter=[hook_name], attention_mask=attention_mask,
                                  stop_at_layer=stop_layer(hook_name))  # fmt: skip
    acts = cache[hook_name]
    if acts.dim() == 4 and hook_name.endswith(("hook_z", "hook_q", "hook_k", "hook_v")):
        acts = acts.flatten(-2)  # [batch, pos, head, d_head] -> [batch, pos, head * d_head]
    if attention_mask is not None:
        return acts[attention_mask.to(acts.device).bool()]
    return acts.flatten(0, -2)


def stream_activations(bridge, batches: Iterable, hook_name: str, *, prepend_bos: bool | None = None) -> Iterator[Tensor]:
    """For each batch (token ids [batch, pos], or texts for the Bridge's tokenizer, whose padding
    is dropped), the activations at hook_name as [n_tokens, d]."""
    for batch in batches:
        mask = None
        if not isinstance(batch, Tensor):
            batch, mask, _ = bridge._model_input(batch, prepend_bos, None, None)
        yield activations(bridge.params, batch.to(bridge.cfg.device), bridge._config, hook_name, mask)
