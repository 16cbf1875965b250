"""Edits in TransformerLens's terms, written to the HF leaves through the family's TL->HF inverse.

``set_tl_weights(params, cfg, {"blocks.0.attn.W_O": value})`` is pure: it returns params whose
TL view holds the new values (unedited leaves are the input's own tensors, edited ones new).
``Bridge.set_tl_weights`` applies the same edit in place. Every key is checked, and every new
leaf computed, before anything is returned or written:

- an unknown TL name, a non-tensor or a wrong shape raises an error naming the key;
- a derived key (``family.tl_derived_keys``: grouped-query ``W_K`` repeats ``_W_K``) raises an
  error naming the source key to edit instead;
- a tied ``unembed.W_U`` is the exception: writing it unties the head into the ``lm_head.weight``
  extra leaf (W_E keeps its value), as TransformerLens's processing unties it. Writing
  ``embed.W_E`` of a tied model writes the shared leaf, so ``W_U`` (= ``W_E.T``) follows;
- a TL key no HF leaf holds (GPT-2's ``unembed.b_U``) goes to the family's declared extra leaf
  for it, or is refused when there is none.

Values are cast to the leaves' dtype and device. Only the leaves an edit touches are recomputed,
and ``hf_from_tl`` sees real tensors only for the TL keys those leaves need.
"""

from __future__ import annotations

import difflib
from typing import Mapping

import torch
from torch import Tensor

from .architectures import family_for
from .config import BridgeConfig
from .params import Params, check_params, params_device, params_dtype
from .tl_layout import TLLayout, hf_dependencies, tl_layout


def present_extras(params: Params, cfg: BridgeConfig) -> tuple[str, ...]:
    """The family's extra leaves these params hold, in the family's order."""
    return tuple(name for name in family_for(cfg).extra_param_shapes(cfg) if name in params)


def set_tl_weights(params: Params, cfg: BridgeConfig, updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """New params whose TL view holds ``updates`` (TL name -> value); pure."""
    leaves = tl_edit_leaves(params, cfg, updates)
    out = {name: leaves.get(name, value) for name, value in params.items()}
    out.update({name: value for name, value in leaves.items() if name not in params})
    return out


def tl_edit_leaves(params: Params, cfg: BridgeConfig, updates: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF leaf -> new value for every leaf the edit touches, then the extra leaves it adds."""
    check_params(params, cfg)
    family = family_for(cfg)
    extras = present_extras(params, cfg)
    layout = tl_layout(cfg, extras)
    device, dtype = params_device(params), params_dtype(params)
    new_extras = set()
    values = {}
    for key, value in updates.items():
        extra = _check_key(layout, cfg, key, value)
        if extra is not None:
            new_extras.add(extra)
        values[key] = value.to(device=device, dtype=dtype)
    extras = tuple(name for name in family.extra_param_shapes(cfg) if name in extras or name in new_extras)
    deps = hf_dependencies(cfg, extras)
    touched = [leaf for leaf, keys in deps.items() if keys & values.keys() or leaf in new_extras]
    tl = {**family.tl_weights(params, cfg), **values}
    needed = _needed_keys(deps, touched)
    inputs = {key: value if key in needed else torch.empty(value.shape, dtype=dtype, device="meta") for key, value in tl.items()}
    computed = family.hf_from_tl(inputs, cfg, extras)
    return {leaf: computed[leaf] for leaf in touched}


def _check_key(layout: TLLayout, cfg: BridgeConfig, key: str, value) -> str | None:
    """Raise if ``key`` cannot be written; return the extra leaf it needs (or None)."""
    arch = cfg.original_architecture
    shape = layout.shapes.get(key, layout.extra_shapes.get(key))
    if shape is None:
        close = difflib.get_close_matches(key, list(layout.shapes) + list(layout.extra_shapes), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown TransformerLens weight {key!r} for {arch}{hint}")
    if not isinstance(value, Tensor):
        raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{key} has shape {shape} in {arch}, got a value of shape {tuple(value.shape)}")
    if key in layout.derived and key not in layout.extra_for:
        raise ValueError(f"{key} is derived from {layout.derived[key]} in {arch}; edit {layout.derived[key]} instead")
    if key in layout.derived or key not in layout.backed:
        if key not in layout.extra_for:
            raise ValueError(
                f"no leaf of {arch} holds {key} (HF's layout has no slot for it and the family "
                "declares no extra leaf for it), so it cannot be written"
            )
        return layout.extra_for[key]
    return None


def _needed_keys(deps: dict[str, frozenset[str]], touched: list[str]) -> set[str]:
    """TL keys the touched leaves read, closed so that no leaf mixes real and placeholder inputs."""
    needed = set().union(*(deps[leaf] for leaf in touched))
    grown = True
    while grown:
        grown = False
        for keys in deps.values():
            if keys & needed and not keys <= needed:
                needed |= keys
                grown = True
    return needed
