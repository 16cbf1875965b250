"""Slicing one dim of a tensor the way TransformerLens's ``pos_slice``/``batch_slice`` do.

None: everything; an int: that index, dropping the dim; a tuple: ``slice(*tuple)``; a slice; a
list, array or tensor of indices. (A TransformerLens ``Slice`` object is also accepted.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def take(x: Tensor, selection, dim: int) -> Tensor:
    """x with `selection` applied along dim."""
    if selection is None:
        return x
    if hasattr(selection, "apply") and hasattr(selection, "mode"):  # a TransformerLens Slice
        return selection.apply(x, dim=dim)
    index = [slice(None)] * x.dim()
    if isinstance(selection, tuple):
        index[dim] = slice(*selection)
    elif isinstance(selection, (int, slice)):
        index[dim] = selection
    else:  # list, numpy array or tensor of indices
        index[dim] = torch.as_tensor(selection, dtype=torch.long, device=x.device)
    return x[tuple(index)]


def unwrapped(selection):
    """A TransformerLens ``Slice`` as the int, slice or index array it holds; anything else as is."""
    if hasattr(selection, "apply") and hasattr(selection, "mode"):
        return selection.slice
    return selection


def selected_indices(selection, size: int) -> list[int]:
    """The indices of range(size) a selection picks (an int picks one)."""
    picked = take(torch.arange(size), selection, 0)
    return [int(picked)] if picked.dim() == 0 else picked.tolist()
