"""ALiBi (BLOOM): a per-head linear bias on the attention scores, from the position ids.

The bias of query i and key j is slope[h] * (pos_j - pos_i): TransformerLens's relative form
(0 on the diagonal, negative into the past), which is what ``hook_attn_scores`` shows. HF's BLOOM
adds slope[h] * pos_j instead; the two differ by a constant per query row, which softmax ignores.
Positions count real tokens (from the padding mask, as HF's BLOOM counts them), so a padded row
gets the bias of the row alone. Slopes are HF's (the ALiBi paper's, also for head counts that
are not powers of two, where TransformerLens 3.9's geometric sequence differs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def alibi_slopes(n_heads: int, device: torch.device) -> Tensor:
    """[n_heads] float32 slopes, as HF's _get_alibi_slopes computes them."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = torch.full((), 2 ** (-(2 ** -(math.log2(closest) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, device=device, dtype=torch.int32))
    if closest != n_heads:
        extra_base = torch.full((), 2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device, dtype=torch.float32)
        remaining = min(closest, n_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, device=device, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def alibi_bias(positions: Tensor, n_heads: int) -> Tensor:
    """positions [batch or 1, pos] -> [batch or 1, n_heads, query_pos, key_pos] float32."""
    relative = (positions[:, None, :] - positions[:, :, None]).float()  # [batch or 1, query_pos, key_pos]
    return alibi_slopes(n_heads, positions.device)[:, None, None] * relative[:, None]
