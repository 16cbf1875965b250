"""Explicit dtype promotion: compute in at least float32, never downcast float64."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """x in float32 if its dtype is narrower (bf16, fp16), else unchanged (float32, float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
