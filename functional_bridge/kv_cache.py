"""The KV cache as data, and the pure forward that takes and returns it.

A ``KVCache`` is a pytree (a NamedTuple of tensors): per layer the keys and values every earlier
token left, ``[batch, pos, n_kv_heads, d_head]`` (after rotary, before any grouped-query
repetition), and the ``[batch, pos]`` bool mask of which cached positions are real tokens (left
padding is False). ``forward_with_kv_cache(params, tokens, cfg, kv_cache=cache)`` runs the new
tokens against the cache and returns their logits and the extended cache; nothing is stored
anywhere else, so it composes with vmap and torch.compile as forward does.

Positions count real tokens over cache and new tokens together (as the uncached forward counts
them); a query attends to the cached keys and the new keys up to itself, inside its layer's
sliding window (windows are counted over padded positions, as the uncached forward counts
them). The cache keeps every position: dropping what a window can no longer see is not done.
Encoders (BERT) have no causal cache and are refused by name.
"""

from __future__ import annotations

from typing import Collection, NamedTuple

import torch
from torch import Tensor

from .architectures import family_for
from .components.alibi import alibi_slopes
from .components.attention import AttentionMask
from .components.embed import position_ids
from .config import BridgeConfig
from .hooks import resolve_hooks
from .params import Params, params_device, params_dtype


class KVCache(NamedTuple):
    keys: tuple[Tensor, ...]  # per layer [batch, pos, n_kv_heads, d_head]
    values: tuple[Tensor, ...]  # per layer [batch, pos, n_kv_heads, d_head]
    mask: Tensor  # [batch, pos] bool: True at real tokens, False at padding

    @property
    def n_positions(self) -> int:
        return self.mask.shape[1]


def empty_kv_cache(params: Params, cfg: BridgeConfig, batch: int) -> KVCache:
    """A cache holding no positions, for a batch of ``batch`` rows."""
    refuse_encoders(cfg)
    device, dtype = params_device(params), params_dtype(params)
    empty = torch.zeros(batch, 0, cfg.n_kv_heads, cfg.d_head, device=device, dtype=dtype)
    layers = tuple(empty for _ in range(cfg.n_layers))
    return KVCache(layers, layers, torch.zeros(batch, 0, dtype=torch.bool, device=device))


def forward_with_kv_cache(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    kv_cache: KVCache | None = None,
    attention_mask: Tensor | None = None,
    hooks=None,
    optional_hooks: Collection[str] = (),
) -> tuple[Tensor, KVCache]:
    """(logits [batch, new_pos, d_vocab_out], the cache extended by tokens [batch, new_pos]).
    attention_mask [batch, new_pos] marks the new tokens' real positions (default: all real);
    kv_cache None starts from an empty cache. Hooks see the new positions only (keys and values
    of the new tokens; scores and pattern [batch, head, new_pos, cached + new_pos])."""
    from .model import check_inputs, transformer  # model imports this module's step type

    refuse_encoders(cfg)
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    batch = tokens.shape[0]
    if kv_cache is None:
        kv_cache = empty_kv_cache(params, cfg, batch)
    _check_cache(kv_cache, cfg, batch, tokens.device)
    if kv_cache.n_positions + tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"cache ({kv_cache.n_positions}) plus new tokens ({tokens.shape[1]}) exceed the model's context n_ctx={cfg.n_ctx}")
    if attention_mask is None:
        attention_mask = torch.ones_like(tokens, dtype=torch.bool)
    step = CacheStep(kv_cache, attention_mask)
    if not hasattr(hooks, "wants"):  # a HookSet, or one by its interface (an SAE splice), is used as it is
        hooks = resolve_hooks(cfg, hooks, (), optional_hooks)
    logits = transformer(params, tokens, cfg, attention_mask, hooks, kv_step=step)
    return logits, step.extended()


class CacheStep:
    """One forward's view of the cache: the new tokens' positions, per-window masks, the ALiBi
    bias, and the per-layer key/value extension (collected here, returned as a new KVCache)."""

    def __init__(self, cache: KVCache, new_mask: Tensor):
        self.cache = cache
        self.full_mask = torch.cat([cache.mask, new_mask.bool()], dim=1)  # [batch, past + new]
        self.past = cache.n_positions
        self.positions = position_ids(self.full_mask, self.full_mask.shape[1], new_mask.device)[:, self.past :]  # [batch, new]
        self._all_positions = position_ids(self.full_mask, self.full_mask.shape[1], new_mask.device)
        self.keys: list[Tensor] = list(cache.keys)
        self.values: list[Tensor] = list(cache.values)

    def attention_mask(self, window: int | None, in_transform: bool) -> AttentionMask:
        """Query i (absolute index past + i) sees key j <= past + i, and j > past + i - window."""
        total = self.full_mask.shape[1]
        device = self.full_mask.device
        query = torch.arange(self.past, total, device=device)[:, None]  # [new, 1]
        key = torch.arange(total, device=device)[None, :]  # [1, past + new]
        causal = key <= query  # [new, past + new]
        if window is not None:
            causal = causal & (key > query - window)
        keys = self.full_mask[:, None, None, :]  # [batch, 1, 1, past + new]
        allowed = causal[None, None] & keys
        return AttentionMask(allowed, allowed.any(-1, keepdim=True), False, in_transform, causal, keys)

    def alibi(self, n_heads: int) -> Tensor:
        """[batch, head, new, past + new] float32: slope * (key position - query position)."""
        relative = (self._all_positions[:, None, :] - self.positions[:, :, None]).float()
        return alibi_slopes(n_heads, relative.device)[:, None, None] * relative[:, None]

    def layer(self, layer: int):
        """k, v [batch, new, n_kv_heads, d_head] -> cached and new [batch, past + new, ...]."""

        def extend(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self.keys[layer] = torch.cat([self.keys[layer], k.to(self.keys[layer].dtype)], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v.to(self.values[layer].dtype)], dim=1)
            return self.keys[layer], self.values[layer]

        return extend

    def extended(self) -> KVCache:
        return KVCache(tuple(self.keys), tuple(self.values), self.full_mask)


def refuse_encoders(cfg: BridgeConfig) -> None:
    if family_for(cfg).forward is not None:
        raise NotImplementedError(f"{cfg.original_architecture} is not a causal decoder: it has no KV cache and cannot generate")


def _check_cache(cache: KVCache, cfg: BridgeConfig, batch: int, device) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache, got {type(cache).__name__}")
    if len(cache.keys) != cfg.n_layers or len(cache.values) != cfg.n_layers:
        raise ValueError(f"kv_cache has {len(cache.keys)} layers of keys and {len(cache.values)} of values; the model has {cfg.n_layers}")
    want = (batch, cache.n_positions, cfg.n_kv_heads, cfg.d_head)
    for layer, (k, v) in enumerate(zip(cache.keys, cache.values)):
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"kv_cache layer {layer}: keys {tuple(k.shape)}, values {tuple(v.shape)}; expected {want}")
    if cache.mask.device != device:
        raise ValueError(f"kv_cache is on {cache.mask.device} but the tokens are on {device}")
