"""ActivationCache: what Bridge.run_with_cache returns, a read-only Mapping of hook name ->
activation (execution order) with TransformerLens's analyses as methods.

It is a pytree (optree namespace "functional_bridge", and torch.utils._pytree, so torch.func
transforms can return it): the activations are the children; the keys, the model and
has_batch_dim are static metadata. Methods that need weights (stack_head_results, logit_attrs,
apply_ln_to_stack's logit lens...) read them from the model's leaves when called, through
fb.tl_weights, so they see the bridge's current parameters and never a snapshot.

Differences from TransformerLens's ActivationCache, deliberately: the cache is never edited in
place (remove_batch_dim, to and apply_slice_to_batch_dim return a new cache; ``cache =
cache.remove_batch_dim()`` works with both), head results are computed on demand rather than
stored under ``hook_result``, and ``key in cache`` tests the exact hook names (shorthands like
``cache["pattern", 0]`` still index).
"""

from __future__ import annotations

import collections
import difflib
import warnings
from typing import Iterator, Mapping

import optree
import torch.utils._pytree as torch_pytree
from torch import Tensor

from . import residual
from .names import act_name
from .source import as_model, current_tl_weights
from .slicing import take

PYTREE_NAMESPACE = "functional_bridge"


class ActivationCache(Mapping):
    """Hook name -> activation, with TransformerLens's residual-stream analyses."""

    def __init__(self, cache_dict: Mapping[str, Tensor], model, has_batch_dim: bool = True, *, cfg=None):
        """model: the Bridge the activations came from (or any object with .params and .cfg, or a
        params mapping with cfg=...)."""
        self._data = dict(cache_dict)
        self.model = as_model(model, cfg)
        self.has_batch_dim = has_batch_dim

    @property
    def cfg(self):
        return self.model.cfg

    def tl_weights(self) -> dict[str, Tensor]:
        """The model's TL weights, derived from its leaves now."""
        return current_tl_weights(self.model)

    # the mapping -------------------------------------------------------------------------------

    def __getitem__(self, key) -> Tensor:
        """A hook name, or TransformerLens's shorthand: "k6", ("pattern", 0), ("scale", 2, "ln2");
        a negative layer counts from the end."""
        if isinstance(key, str) and key in self._data:
            return self._data[key]
        if isinstance(key, tuple):
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], key[1] + self.cfg.n_layers, *key[2:])
            name = act_name(*key)
        elif isinstance(key, str):
            name = act_name(key)
        else:
            raise TypeError(f"cache keys are hook names or (name, layer[, sublayer]) tuples, got {key!r}")
        if name not in self._data:
            close = difflib.get_close_matches(name, list(self._data), n=3, cutoff=0.6)
            hint = f"; closest cached: {', '.join(close)}" if close else ""
            raise KeyError(f"{name!r} is not in this cache ({len(self._data)} activations{hint})")
        return self._data[name]

    def __contains__(self, key) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def keys(self):
        return self._data.keys()

    def values(self):
        return self._data.values()

    def items(self):
        return self._data.items()

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations, has_batch_dim={self.has_batch_dim}, keys={list(self._data)})"

    # new caches --------------------------------------------------------------------------------

    def _replace(self, data: Mapping[str, Tensor], has_batch_dim: bool) -> "ActivationCache":
        return ActivationCache(data, self.model, has_batch_dim)

    def to(self, *args, **kwargs) -> "ActivationCache":
        """A new cache with every activation ``.to(*args, **kwargs)`` (device, dtype...)."""
        return self._replace({k: v.to(*args, **kwargs) for k, v in self._data.items()}, self.has_batch_dim)

    def _batch_size(self) -> int:
        sizes = collections.Counter(v.shape[0] for v in self._data.values() if v.dim() > 0)
        return sizes.most_common(1)[0][0] if sizes else 1

    def remove_batch_dim(self) -> "ActivationCache":
        """A new cache without the batch dim (the batch must have size 1)."""
        if not self.has_batch_dim:
            warnings.warn("remove_batch_dim: this cache has no batch dim left", stacklevel=2)
            return self
        if self._batch_size() != 1:
            raise ValueError(f"remove_batch_dim needs batch size 1, this cache has {self._batch_size()}")
        return self._replace({k: v[0] if v.dim() and v.shape[0] == 1 else v for k, v in self._data.items()}, False)

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache with batch_slice (an int, tuple, slice or indices) applied to the batch dim."""
        if not self.has_batch_dim:
            raise ValueError("this cache has no batch dim to slice")
        size = self._batch_size()
        data = {k: take(v, batch_slice, 0) if v.dim() and v.shape[0] == size else v for k, v in self._data.items()}
        return self._replace(data, not isinstance(batch_slice, int))

    # analyses (functions of the cache; see residual.py) ----------------------------------------

    accumulated_resid = residual.accumulated_resid
    decompose_resid = residual.decompose_resid
    head_results = residual.head_results
    stack_head_results = residual.stack_head_results
    get_neuron_results = residual.neuron_results
    stack_neuron_results = residual.stack_neuron_results
    get_full_resid_decomposition = residual.get_full_resid_decomposition
    apply_ln_to_stack = residual.apply_ln_to_stack
    logit_attrs = residual.logit_attrs
    stack_activation = residual.stack_activation


# pytree registration: activations are the children, everything else static metadata.


def _flatten(cache: ActivationCache):
    keys = tuple(cache._data)
    return list(cache._data.values()), (keys, cache.model, cache.has_batch_dim), keys


def _unflatten(metadata, children) -> ActivationCache:
    keys, model, has_batch_dim = metadata
    return ActivationCache(dict(zip(keys, children)), model, has_batch_dim)


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
