"""Token embedding, learned absolute positions, and position ids from a padding mask."""

from __future__ import annotations

import torch
from torch import Tensor


def position_ids(attention_mask: Tensor | None, seq_len: int, device: torch.device) -> Tensor:
    """[batch, pos] positions counting only real tokens (padding before a row's first real token
    gets 0), or [1, pos] = 0..pos-1 without a mask."""
    if attention_mask is None:
        return torch.arange(seq_len, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def embed_tokens(tokens: Tensor, W_E: Tensor) -> Tensor:
    """tokens [batch, pos], W_E [d_vocab, d_model] -> [batch, pos, d_model]. Plain indexing, not
    F.embedding: under vmap over stacked embeddings (an ensemble), F.embedding's batching rule
    copies the whole [d_vocab, K, d_model] table every call (measured: 1.6x slower forwards)."""
    return W_E[tokens]


def learned_positions(
    W_pos: Tensor, positions: Tensor, attention_mask: Tensor | None, batch: int
) -> Tensor:
    """[batch, pos, d_model] absolute position embeddings, zero at padding tokens (as
    HookedTransformer's hook_pos_embed)."""
    pos_embed = W_pos[positions]  # [batch or 1, pos, d_model]
    if attention_mask is None:
        return pos_embed.expand(batch, -1, -1)
    return pos_embed.masked_fill(~attention_mask.bool()[..., None], 0.0)
