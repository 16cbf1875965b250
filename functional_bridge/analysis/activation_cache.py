"""ActivationCache: what Bridge.run_with_cache returns. TransformerLens 3.9's ActivationCache:
hook name -> activation in execution order (``cache.cache_dict``), TL's shorthands
(``cache["pattern", 0]``), and TL's analyses as methods, with TL's signatures and effects:
``remove_batch_dim()``, ``to(device)`` and ``compute_head_results()`` edit the cache in place
(``stack_head_results`` computes and caches the head results first, as TL's does), while
``apply_slice_to_batch_dim`` returns a new cache.

Methods that need weights read them from the model's leaves when called, through
fb.tl_weights, so they see the bridge's current parameters and never a snapshot. The cache is
also a Mapping and a pytree (optree namespace "functional_bridge", and torch.utils._pytree, so
torch.func transforms can return it): the activations are the children; the keys, the model
and the flags are static metadata.

Beyond TL, on purpose: ``key in cache`` tests the exact hook names (TL's too, through
iteration); a missing key's KeyError names the closest cached ones; bad input raises
ValueError (TL asserts); the analyses' own differences are in residual.py and
component_stacks.py.
"""

from __future__ import annotations

import collections
import difflib
import logging
from typing import Iterator, Mapping

import optree
import torch
import torch.utils._pytree as torch_pytree
from torch import Tensor

from . import component_stacks, residual
from .names import act_name
from .slicing import take
from .source import as_model, current_tl_weights

PYTREE_NAMESPACE = "functional_bridge"


class ActivationCache(Mapping):
    """Hook name -> activation, with TransformerLens's residual-stream analyses."""

    __eq__ = object.__eq__  # identity, as TL's (Mapping's would compare tensors)
    __hash__ = object.__hash__

    def __init__(self, cache_dict: Mapping[str, Tensor], model, has_batch_dim: bool = True, *, cfg=None):
        """model: the Bridge the activations came from (or any object with .params and .cfg, a
        params mapping with cfg=..., or None for a cache without analyses). A dict is kept as
        is, as TL does: the in-place methods edit it."""
        self.cache_dict = cache_dict if type(cache_dict) is dict else dict(cache_dict)
        self.model = None if model is None else as_model(model, cfg)
        self.has_batch_dim = has_batch_dim
        self.has_embed = "hook_embed" in self.cache_dict
        self.has_pos_embed = "hook_pos_embed" in self.cache_dict

    @property
    def cfg(self):
        if self.model is None:
            raise ValueError("this cache has no model (cache.model is None), so it has no config or weights")
        return self.model.cfg

    def tl_weights(self) -> dict[str, Tensor]:
        """The model's TL weights, derived from its leaves now."""
        self.cfg  # a clear error without a model
        return current_tl_weights(self.model)

    # the mapping -------------------------------------------------------------------------------

    def __getitem__(self, key) -> Tensor:
        """A hook name, or TransformerLens's shorthand: "k6", ("pattern", 0), ("scale", 2, "ln2");
        a negative layer counts from the end."""
        if isinstance(key, str):
            if key in self.cache_dict:
                return self.cache_dict[key]
            name = act_name(key)
        elif isinstance(key, tuple) and key and isinstance(key[0], str):
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], key[1] + self.cfg.n_layers, *key[2:])
            name = act_name(*key)
        else:
            raise TypeError(f"cache keys are hook names or (name, layer[, sublayer]) tuples, got {key!r}")
        if name not in self.cache_dict:
            close = difflib.get_close_matches(name, list(self.cache_dict), n=3, cutoff=0.6)
            hint = f"; closest cached: {', '.join(close)}" if close else ""
            raise KeyError(f"{name!r} is not in this cache ({len(self.cache_dict)} activations{hint})")
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        return key in self.cache_dict

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict.keys())}"

    # TL's state changes ------------------------------------------------------------------------

    def _batch_size(self) -> int:
        """The most common leading dim across entries (entries broadcast over the batch, or
        indexed by position, are outnumbered), as TL's."""
        sizes = collections.Counter(v.shape[0] for v in self.cache_dict.values() if v.ndim > 0)
        return sizes.most_common(1)[0][0] if sizes else 1

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dim (batch size 1) of every entry, in place; returns this cache."""
        if not self.has_batch_dim:
            logging.warning("Tried removing batch dimension after already having removed it.")
            return self
        batch_size = self._batch_size()
        if batch_size != 1:
            raise ValueError(f"Cannot remove batch dimension from cache with batch size {batch_size}")
        for key, value in self.cache_dict.items():
            if value.ndim > 0 and value.shape[0] == 1:
                self.cache_dict[key] = value[0]
        self.has_batch_dim = False
        return self

    def to(self, device, move_model: bool | None = None) -> "ActivationCache":
        """Move every activation ``.to(device)`` (a device, or anything Tensor.to takes alone,
        e.g. a dtype), in place; returns this cache. move_model=True also moves the model, as
        TL 2.x's deprecated option did (TL 3.9 dropped it)."""
        moved = {key: value.to(device) for key, value in self.cache_dict.items()}
        if move_model:
            if not hasattr(self.model, "to"):
                raise ValueError("move_model=True: this cache's model cannot be moved (it has no .to)")
            self.model.to(device)
        self.cache_dict = moved
        return self

    def toggle_autodiff(self, mode: bool = False) -> None:
        """torch.set_grad_enabled(mode): global state, not just this cache (TL's warning)."""
        logging.warning("Changed the global state, set autodiff to %s", mode)
        torch.set_grad_enabled(mode)

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache with batch_slice (an int, a (start, stop[, step]) tuple, a slice, or
        indices) applied to every batched entry; an int removes the batch dim."""
        if not self.has_batch_dim:
            raise ValueError("Cannot index into a cache without a batch dim")
        size = self._batch_size()
        sliced = {k: take(v, batch_slice, 0) if v.ndim > 0 and v.shape[0] == size else v for k, v in self.cache_dict.items()}
        drops_dim = isinstance(batch_slice, int) or getattr(batch_slice, "mode", None) == "int"  # a TL Slice
        return ActivationCache(sliced, self.model, has_batch_dim=not drops_dim)

    # analyses (functions of the cache; see residual.py and component_stacks.py) ----------------

    accumulated_resid = residual.accumulated_resid
    decompose_resid = residual.decompose_resid
    apply_ln_to_stack = residual.apply_ln_to_stack
    logit_attrs = residual.logit_attrs
    stack_activation = residual.stack_activation
    compute_head_results = component_stacks.compute_head_results
    head_results = component_stacks.head_results
    stack_head_results = component_stacks.stack_head_results
    get_neuron_results = component_stacks.get_neuron_results
    stack_neuron_results = component_stacks.stack_neuron_results
    get_full_resid_decomposition = component_stacks.get_full_resid_decomposition

    # TL's state-space-model methods: no family here has an SSM mixer ---------------------------

    def ssm_layers(self, mixer_type=None) -> list[int]:
        """The blocks whose mixer is an SSM: none in the families functional_bridge supports."""
        return []

    def compute_ssm_state(self, layer=None, time_step=None):
        raise self._no_ssm(layer)

    def compute_ssm_effective_attention(self, layer=None, include_dt_scaling=False, per_state_coord=False):
        raise self._no_ssm(layer)

    def _no_ssm(self, layer) -> Exception:
        if layer is not None:
            return TypeError(f"Block {layer} has no SSM mixer: {self.cfg.original_architecture} is not a state-space model")
        return RuntimeError(f"No SSM mixer layers found: {self.cfg.original_architecture} is not a state-space model")


# pytree registration: activations are the children, everything else static metadata.


def _flatten(cache: ActivationCache):
    keys = tuple(cache.cache_dict)
    metadata = (keys, cache.model, cache.has_batch_dim, cache.has_embed, cache.has_pos_embed)
    return list(cache.cache_dict.values()), metadata, keys


def _unflatten(metadata, children) -> ActivationCache:
    keys, model, has_batch_dim, has_embed, has_pos_embed = metadata
    cache = ActivationCache(dict(zip(keys, children)), model, has_batch_dim)
    cache.has_embed, cache.has_pos_embed = has_embed, has_pos_embed
    return cache


optree.register_pytree_node(
    ActivationCache, _flatten, _unflatten, path_entry_type=optree.MappingEntry, namespace=PYTREE_NAMESPACE
)
torch_pytree.register_pytree_node(
    ActivationCache,
    lambda cache: _flatten(cache)[:2],
    lambda children, metadata: _unflatten(metadata, children),
    serialized_type_name="functional_bridge.ActivationCache",
    flatten_with_keys_fn=lambda cache: (
        [(torch_pytree.MappingKey(k), v) for k, v in cache.items()],
        _flatten(cache)[1],
    ),
)
