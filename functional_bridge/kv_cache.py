"""The KV cache as data, and the pure forward that takes and returns it.

A ``KVCache`` is a pytree (a NamedTuple of tensors): per layer the keys and values every earlier
token left, ``[batch, pos, n_kv_heads, d_head]`` (after rotary, before any grouped-query
repetition); the ``[batch, pos]`` bool mask of which cached positions are real tokens (left
padding is False), or a ``[batch, 0]`` one when no token so far was padding (a shape, not a
None: vmap returns only tensors); and ``n_real`` [batch], the real
tokens seen so far (the next token's position id). ``forward_with_kv_cache(params, tokens, cfg,
kv_cache=cache)`` runs the new tokens against the cache and returns their logits and the extended
cache; nothing is stored anywhere else, so it composes with vmap and torch.compile as forward does.

Positions count real tokens over cache and new tokens together (as the uncached forward counts
them); a query attends to the cached keys and the new keys up to itself, inside its layer's
sliding window (windows are counted over padded positions, as the uncached forward counts
them). When every layer is windowed, the returned cache keeps only the last ``window - 1``
positions, all that a later query can see: it stops growing. Without padding (no
attention_mask, a cache whose mask is [batch, 0]) a one-token step attends to every cached key with no mask
at all, as HF's decoding does. The cache grows by concatenation, as HF's default DynamicCache
does: a preallocated buffer would need in-place writes into the caller's cache.
Encoders (BERT) have no causal cache and are refused by name.
"""

from __future__ import annotations

from typing import Collection, NamedTuple

import torch
from torch import Tensor

from .architectures import family_for
from .components.alibi import alibi_slopes
from .components.attention import AttentionMask, build_attention_mask
from .config import BridgeConfig
from .hooks import resolve_hooks
from .params import Params, params_device, params_dtype


class KVCache(NamedTuple):
    keys: tuple[Tensor, ...]  # per layer [batch, pos, n_kv_heads, d_head]
    values: tuple[Tensor, ...]  # per layer [batch, pos, n_kv_heads, d_head]
    mask: Tensor  # [batch, pos] bool: True at real tokens, False at padding; [batch, 0]: no padding
    n_real: Tensor  # [batch] int64: real tokens seen, evicted ones included (the next position id)

    @property
    def n_positions(self) -> int:
        """Positions held (after any sliding-window eviction)."""
        return self.keys[0].shape[1]

    @property
    def padded(self) -> bool:
        """Whether the mask records padding (else no position held is padding)."""
        return self.mask.shape[1] > 0


def empty_kv_cache(params: Params, cfg: BridgeConfig, batch: int) -> KVCache:
    """A cache holding no positions, for a batch of ``batch`` rows."""
    refuse_encoders(cfg)
    device, dtype = params_device(params), params_dtype(params)
    empty = torch.zeros(batch, 0, cfg.n_kv_heads, cfg.d_head, device=device, dtype=dtype)
    layers = tuple(empty for _ in range(cfg.n_layers))
    no_padding = torch.ones(batch, 0, dtype=torch.bool, device=device)
    return KVCache(layers, layers, no_padding, torch.zeros(batch, dtype=torch.long, device=device))


def forward_with_kv_cache(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    kv_cache: KVCache | None = None,
    attention_mask: Tensor | None = None,
    hooks=None,
    optional_hooks: Collection[str] = (),
    logits_to_keep: int | None = None,
) -> tuple[Tensor, KVCache]:
    """(logits [batch, new_pos, d_vocab_out], the cache extended by tokens [batch, new_pos]).
    attention_mask [batch, new_pos] marks the new tokens' real positions (default: all real);
    kv_cache None starts from an empty cache. Hooks see the new positions only (keys and values
    of the new tokens; scores and pattern [batch, head, new_pos, cached + new_pos]).
    logits_to_keep: unembed only the last n positions (HF's argument; generation needs the last
    one), unless a hook reads ln_final or the unembedding: then every position runs and the logits
    are sliced after."""
    from .model import check_inputs  # model imports this module's step type

    refuse_encoders(cfg)
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    batch = tokens.shape[0]
    if kv_cache is None:
        kv_cache = empty_kv_cache(params, cfg, batch)
    _check_cache(kv_cache, cfg, batch, tokens.device)
    if kv_cache.n_positions + tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"cache ({kv_cache.n_positions}) plus new tokens ({tokens.shape[1]}) exceed the model's context n_ctx={cfg.n_ctx}")
    if logits_to_keep is not None and (not isinstance(logits_to_keep, int) or logits_to_keep < 1):
        raise ValueError(f"logits_to_keep must be a positive int or None, got {logits_to_keep!r}")
    return _cached_forward(params, tokens, cfg, kv_cache, attention_mask, hooks, optional_hooks, logits_to_keep)


def decode_step(
    params: Params, tokens: Tensor, cfg: BridgeConfig, kv_cache: KVCache, *, hooks=None, optional_hooks: Collection[str] = (),
    logits_to_keep: int | None = None,
) -> tuple[Tensor, KVCache]:
    """forward_with_kv_cache without its input checks, for a decoding loop's later steps: tokens
    [batch, new] int64 ids the loop produced (all real tokens), kv_cache the loop's previous step's
    (its params and batch already checked). Validating the params' 150-odd leaves each step costs
    about 1 ms on CPU, ~2% of a GPT-2-small step."""
    if kv_cache.n_positions + tokens.shape[1] > cfg.n_ctx:
        raise ValueError(f"cache ({kv_cache.n_positions}) plus new tokens ({tokens.shape[1]}) exceed the model's context n_ctx={cfg.n_ctx}")
    return _cached_forward(params, tokens, cfg, kv_cache, None, hooks, optional_hooks, logits_to_keep)


def _cached_forward(params, tokens, cfg, kv_cache, attention_mask, hooks, optional_hooks, logits_to_keep):
    from .model import transformer

    step = CacheStep(kv_cache, attention_mask, tokens.shape[1], tokens.device, keep=evicting_window(cfg))
    if not hasattr(hooks, "wants"):  # a HookSet, or one by its interface (an SAE splice), is used as it is
        hooks = resolve_hooks(cfg, hooks, (), optional_hooks)
    logits = transformer(params, tokens, cfg, step.new_mask, hooks, kv_step=step, logits_to_keep=logits_to_keep)
    return logits, step.extended()


def evicting_window(cfg: BridgeConfig) -> int | None:
    """Positions a cache must keep when every layer is windowed (the widest window less one: the
    next query sees itself and window - 1 earlier positions); None when some layer is global."""
    windows = [cfg.layer_window(layer) for layer in range(cfg.n_layers)]
    if not windows or any(w is None for w in windows):
        return None
    return max(windows) - 1


class CacheStep:
    """One forward's view of the cache: the new tokens' positions, per-window masks, the ALiBi
    bias, and the per-layer key/value extension (collected here, returned as a new KVCache)."""

    def __init__(self, cache: KVCache, new_mask: Tensor | None, new: int, device, keep: int | None = None):
        self.cache, self.new, self.device, self.keep = cache, new, device, keep
        self.past = cache.n_positions
        if new_mask is None and cache.padded:
            new_mask = cache.mask.new_ones(cache.mask.shape[0], new)
        if new_mask is None:
            self.full_mask = None
        elif cache.padded:
            self.full_mask = torch.cat([cache.mask, new_mask], dim=1)  # [batch, past + new]
        else:
            self.full_mask = torch.cat([new_mask.new_ones(new_mask.shape[0], self.past), new_mask], dim=1)
        self.new_mask = new_mask  # [batch, new] bool, or None: no padding anywhere
        if new_mask is None:  # every row has seen the same count: one row of positions
            self.positions = cache.n_real[:1, None] + torch.arange(new, device=device)  # [1, new]
            self.n_real = cache.n_real + new
        else:
            counts = new_mask.long().cumsum(-1)  # [batch, new]
            self.positions = (cache.n_real[:, None] + counts - 1).clamp(min=0)  # [batch, new]
            self.n_real = cache.n_real + counts[:, -1]
        self.keys: list[Tensor] = list(cache.keys)
        self.values: list[Tensor] = list(cache.values)

    def attention_mask(self, window: int | None, in_transform: bool) -> AttentionMask:
        """Query i (index past + i) sees key j <= past + i, and j > past + i - window."""
        total = self.past + self.new
        if window is not None and window >= total:  # the window masks nothing here
            window = None
        if self.full_mask is None and window is None:
            if self.past == 0:
                return build_attention_mask(self.new, None, self.device, None, in_transform)  # plain causal
            if self.new == 1:  # one query seeing every key: no mask at all
                return AttentionMask(None, None, False, in_transform, torch.ones(1, total, dtype=torch.bool, device=self.device))
        query = torch.arange(self.past, total, device=self.device)[:, None]  # [new, 1]
        key = torch.arange(total, device=self.device)[None, :]  # [1, past + new]
        causal = key <= query  # [new, past + new]
        if window is not None:
            causal = causal & (key > query - window)
        if self.full_mask is None:
            return AttentionMask(causal[None, None], None, False, in_transform, causal, None)
        keys = self.full_mask[:, None, None, :]  # [batch, 1, 1, past + new]
        allowed = causal[None, None] & keys
        return AttentionMask(allowed, allowed.any(-1, keepdim=True), False, in_transform, causal, keys)

    def alibi(self, n_heads: int) -> Tensor:
        """[batch or 1, head, new, past + new] float32: slope * (key position - query position).
        Cached keys' positions: counted back from the new tokens' (held positions only)."""
        if self.full_mask is None:
            key_positions = self.cache.n_real[:1, None] + torch.arange(-self.past, self.new, device=self.device)  # [1, past + new]
        else:
            from_end = self.full_mask.long().flip(-1).cumsum(-1).flip(-1) - self.full_mask.long()  # real keys after each
            key_positions = (self.n_real[:, None] - 1 - from_end).clamp(min=0)  # [batch, past + new]
        relative = (key_positions[:, None, :] - self.positions[:, :, None]).float()
        return alibi_slopes(n_heads, relative.device)[:, None, None] * relative[:, None]

    def layer(self, layer: int):
        """k, v [batch, new, n_kv_heads, d_head] -> cached and new [batch, past + new, ...]."""

        def extend(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            self.keys[layer] = torch.cat([self.keys[layer], k.to(self.keys[layer].dtype)], dim=1)
            self.values[layer] = torch.cat([self.values[layer], v.to(self.values[layer].dtype)], dim=1)
            return self.keys[layer], self.values[layer]

        return extend

    def extended(self) -> KVCache:
        """The cache after this step; when every layer is windowed, only what a later query can see."""
        keys, values = tuple(self.keys), tuple(self.values)
        mask = self.cache.mask if self.full_mask is None else self.full_mask  # [batch, 0] stays so
        if self.keep is not None and self.past + self.new > self.keep:
            start = self.past + self.new - self.keep
            keys = tuple(k[:, start:] for k in keys)
            values = tuple(v[:, start:] for v in values)
            mask = mask if self.full_mask is None else mask[:, start:]
        return KVCache(keys, values, mask, self.n_real)


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
    if cache.mask.dim() != 2 or cache.mask.shape[0] != batch or cache.mask.shape[1] not in (0, cache.n_positions):
        raise ValueError(f"kv_cache mask {tuple(cache.mask.shape)}; expected {want[:2]} (or ({batch}, 0): no padding)")
    if tuple(cache.n_real.shape) != (batch,):
        raise ValueError(f"kv_cache n_real {tuple(cache.n_real.shape)}; expected ({batch},)")
    if cache.n_real.device != device:
        raise ValueError(f"kv_cache is on {cache.n_real.device} but the tokens are on {device}")
