"""Affine maps applied to HF weights in their own storage layout, without copies.

GPT-2's Conv1D stores W as [d_in, d_out] (y = x @ W + b, one addmm as HF runs it); nn.Linear
stores W as [d_out, d_in] (y = x @ W.T + b). Families describe each projection as an Affine
and the forward runs it in whichever layout the leaf already has.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Affine(NamedTuple):
    weight: Tensor  # [d_in, d_out] if in_out else [d_out, d_in]
    bias: Tensor | None  # [d_out]
    in_out: bool  # True: Conv1D layout (x @ W); False: nn.Linear layout (x @ W.T)


def affine(x: Tensor, proj: Affine) -> Tensor:
    """x: [..., d_in] -> [..., d_out]."""
    if not proj.in_out:
        return F.linear(x, proj.weight, proj.bias)
    if proj.bias is None:
        return x @ proj.weight
    flat = torch.addmm(proj.bias, x.reshape(-1, x.shape[-1]), proj.weight)
    return flat.view(*x.shape[:-1], proj.weight.shape[-1])
