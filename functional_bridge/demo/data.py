"""Repeated random sequences: x + x, the task that needs (and so grows) induction heads."""

from __future__ import annotations

import torch
from torch import Tensor


def repeated_tokens(batch: int, half: int, vocab: int, generator: torch.Generator, device=None) -> Tensor:
    """[batch, 2 * half]: a random first half, then the same tokens again."""
    first = torch.randint(0, vocab, (batch, half), generator=generator)
    return torch.cat([first, first], dim=1).to(device)


def training_batches(batch: int, lengths: tuple[int, int], vocab: int, seed: int, device=None):
    """Endless batches of repeated sequences; each batch draws its half-length L uniformly from
    [lengths[0], lengths[1]], so no single offset can be learned as a positional shortcut."""
    generator = torch.Generator().manual_seed(seed)
    low, high = lengths
    while True:
        half = int(torch.randint(low, high + 1, (1,), generator=generator))
        yield repeated_tokens(batch, half, vocab, generator, device)
