"""Which TL weights the HF leaves hold, found by tracing the family's functions on meta tensors.

A family's ``tl_weights`` and ``hf_from_tl`` are traced once per (config, extra leaves) with
autograd on the meta device (no memory, no arithmetic): a TL key that depends on no leaf is a
constant of the conversion (Llama's zero b_Q, a bias HF lacks); a TL key that an absent extra
leaf would supply says which extra to add when it is written; ``hf_from_tl``'s dependencies say
which leaves an edit touches and which TL keys computing them needs. Everything here depends on
shapes only, so it is cached, never branches on a tensor's value, and runs outside
torch.compile's graph (a graph break, not a retrace).
"""

from __future__ import annotations

import functools
from functools import lru_cache
from typing import NamedTuple

import torch

from .architectures import family_for
from .config import BridgeConfig

Shape = tuple[int, ...]


class TLLayout(NamedTuple):
    shapes: dict[str, Shape]  # TL key -> shape, with these extra leaves present
    backed: frozenset[str]  # TL keys that are functions of some leaf (the rest are constants)
    derived: dict[str, str]  # derived TL key -> its source, unless an extra leaf now holds it
    extra_for: dict[str, str]  # TL key -> the absent extra leaf that would hold it on its own
    extra_shapes: dict[str, Shape]  # TL key -> shape, for keys only an absent extra adds


def _meta(shapes: dict[str, Shape], grad: set[str] | frozenset[str]) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta", requires_grad=name in grad) for name, shape in shapes.items()}


def _traced():
    """Autograd on, whatever the caller's mode (no_grad, inference_mode): tracing needs it."""
    return torch.inference_mode(False), torch.enable_grad()


def leaf_shapes(cfg: BridgeConfig, extras: tuple[str, ...]) -> dict[str, Shape]:
    family = family_for(cfg)
    optional = family.extra_param_shapes(cfg)
    return {**family.param_shapes(cfg), **{name: optional[name] for name in extras}}


def _dependencies(outputs: dict, inputs: dict, keys) -> dict[str, frozenset[str]]:
    """Output key -> the names of the inputs it is computed from (one meta backward per key)."""
    names, values = list(inputs), list(inputs.values())
    deps = {}
    for key in keys:
        value = outputs[key]
        if not value.requires_grad:
            deps[key] = frozenset()
            continue
        grads = torch.autograd.grad(
            value, values, grad_outputs=torch.empty_like(value), retain_graph=True, allow_unused=True
        )
        deps[key] = frozenset(name for name, g in zip(names, grads) if g is not None)
    return deps


def _eager_only(fn):
    """Run fn outside torch.compile's graph (it traces with autograd on meta tensors; compile
    calls it as a constant). torch.compiler.disable is applied at call time, only while
    compiling: decorating at import would import torch._dynamo (~1 s) for everyone."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call


@_eager_only
@lru_cache(maxsize=64)
def tl_layout(cfg: BridgeConfig, extras: tuple[str, ...]) -> TLLayout:
    """The TL view's structure for params holding the family's leaves plus ``extras``. Extra
    leaves are assumed independent: each holds its own TL keys whatever other extras exist."""
    family = family_for(cfg)
    shapes = leaf_shapes(cfg, extras)
    absent = tuple(name for name in family.extra_param_shapes(cfg) if name not in extras)
    mode, grad = _traced()
    with mode, grad:
        leaves = _meta(shapes, set(shapes))
        tl = family.tl_weights(leaves, cfg)
        pairs = {d: s for d, s in family.tl_derived_keys(cfg).items() if d in tl}
        deps = _dependencies(tl, leaves, {*pairs, *pairs.values()})
        all_leaves = _meta(leaf_shapes(cfg, extras + absent), set(shapes) | set(absent))
        tl_all = family.tl_weights(all_leaves, cfg)
        deps_all = _dependencies(tl_all, all_leaves, list(tl_all))
    # a derived key stays derived while it reads its source's leaves (an untied W_U does not);
    # a constant one (a grouped-query b_K where HF has no k bias) while the extra leaf that would
    # hold it holds its source too, else writing it would add that leaf and drop the value
    derived = {d: s for d, s in pairs.items() if deps[d] & deps[s] or deps_all[d] & deps_all[s]}
    extra_for = {}
    for key, leaves_of_key in deps_all.items():
        extra = next((name for name in absent if name in leaves_of_key), None)
        if extra is None:
            continue
        if key in derived and deps_all[key] & deps_all[derived[key]]:
            continue  # the extra feeds the source too (a grouped-query bias): no way to untie
        extra_for[key] = extra
    return TLLayout(
        shapes={key: tuple(value.shape) for key, value in tl.items()},
        backed=frozenset(key for key, value in tl.items() if value.requires_grad),
        derived=derived,
        extra_for=extra_for,
        extra_shapes={key: tuple(value.shape) for key, value in tl_all.items() if key not in tl},
    )


@_eager_only
@lru_cache(maxsize=64)
def hf_dependencies(cfg: BridgeConfig, extras: tuple[str, ...]) -> dict[str, frozenset[str]]:
    """HF leaf -> the TL keys ``hf_from_tl`` computes it from."""
    family = family_for(cfg)
    shapes = tl_layout(cfg, extras).shapes
    mode, grad = _traced()
    with mode, grad:
        tl = _meta(shapes, set(shapes))
        leaves = family.hf_from_tl(tl, cfg, extras)
        return _dependencies(leaves, tl, list(leaves))
