"""Readers shared by the families: HF leaves -> the components' weight tuples (views, no copies)."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..components.linear import Affine
from ..components.norms import Norm
from ..config import BridgeConfig
from .family import Params


def linear(params: Params, name: str) -> Affine:
    """An nn.Linear ([d_out, d_in]); its bias if the leaf exists (processing may add one)."""
    return Affine(params[name + ".weight"], params.get(name + ".bias"), in_out=False)


def conv1d(params: Params, name: str) -> Affine:
    """GPT-2's Conv1D ([d_in, d_out], always biased)."""
    return Affine(params[name + ".weight"], params[name + ".bias"], in_out=True)


def layer_norm(params: Params, name: str) -> Norm:
    return Norm(params[name + ".weight"], params[name + ".bias"], "LN")


def rms_norm(params: Params, weight: str) -> Norm:
    return Norm(params[weight], None, "RMS")


def unembedding(params: Params, head: str, embed: str) -> Tensor:
    """[d_vocab_out, d_model]: the head's own leaf if it has one (untied), else the embedding."""
    return params[head] if head in params else params[embed]


def tied_aliases(head: str, embed: str) -> Callable[[BridgeConfig], dict[str, str]]:
    """Family.tied_aliases for a head that HF ties to the token embedding when configured so."""

    def aliases(cfg: BridgeConfig) -> dict[str, str]:
        return {head: embed} if cfg.tie_word_embeddings else {}

    return aliases


def tied_unembedding(cfg: BridgeConfig) -> dict[str, str]:
    """Family.tl_derived_keys entry of a tied head: TL's unembed.W_U is embed.W_E, transposed."""
    return {"unembed.W_U": "embed.W_E"} if cfg.tie_word_embeddings else {}
