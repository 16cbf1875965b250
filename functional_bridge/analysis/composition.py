"""Q-, K- and V-composition scores between heads (A Mathematical Framework for Transformer
Circuits): ||W_left W_right||_F / (||W_left||_F ||W_right||_F), from the factors alone.

With W_left = La Lb and W_right = Ra Rb, and reduced QRs La = Q1 R1, Rb^T = Q2 R2, the numerator
is ||R1 (Lb Ra) R2^T||_F: a product of [.., mdim, mdim] matrices, never [d_model, d_model].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import BridgeConfig
from ..params import Params
from ..weights import tl_weights
from .circuits import ov_from_tl, qk_from_tl
from .factored_matrix import FactoredMatrix, _supported

MODES = ("Q", "K", "V")


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> Tensor:
    """||left @ right|| / (||left|| ||right||) over the leading dims. broadcast_dims=True pairs
    every left matrix with every right one: result [*left_leading, *right_leading]; False
    broadcasts the leading dims against each other."""
    if broadcast_dims:
        n_left, n_right = left.ndim - 2, right.ndim - 2
        left = FactoredMatrix(_append_dims(left.A, n_right), _append_dims(left.B, n_right))
        right = FactoredMatrix(_prepend_dims(right.A, n_left), _prepend_dims(right.B, n_left))
    if left.rdim != right.ldim:
        raise ValueError(f"composition needs left.rdim == right.ldim, got {tuple(left.shape)} and {tuple(right.shape)}")
    R1 = torch.linalg.qr(_supported(left.A))[1]  # [.., k1, left.mdim]
    R2 = torch.linalg.qr(_supported(right.B).mT)[1]  # [.., k2, right.mdim]
    middle = _supported(left.B) @ _supported(right.A)  # [.., left.mdim, right.mdim]
    numerator = torch.linalg.matrix_norm(R1 @ middle @ R2.mT)
    return numerator / (_frobenius(left) * _frobenius(right))


def _frobenius(matrix: FactoredMatrix) -> Tensor:
    """||A B||_F = ||Ra Rb^T||_F with A = Qa Ra, B^T = Qb Rb (reduced QRs): a few times cheaper
    than FactoredMatrix.norm, which sums the squared singular values as TL does."""
    Ra = torch.linalg.qr(_supported(matrix.A))[1]  # [.., ka, mdim]
    Rb = torch.linalg.qr(_supported(matrix.B).mT)[1]  # [.., kb, mdim]
    return torch.linalg.matrix_norm(Ra @ Rb.mT)


def _append_dims(x: Tensor, n: int) -> Tensor:
    """[*lead, a, b] -> [*lead, 1 (n times), a, b]."""
    return x.reshape(*x.shape[:-2], *(1,) * n, *x.shape[-2:])


def _prepend_dims(x: Tensor, n: int) -> Tensor:
    return x.reshape(*(1,) * n, *x.shape)


def all_composition_scores(params: Params, cfg: BridgeConfig, mode: str) -> Tensor:
    """[n_layers, n_heads, n_layers, n_heads]: how much each head's output (OV) composes with
    each later head's query (mode "Q", QK), key ("K", QK^T) or value ("V", OV) input. Zero where
    the second head is not in a strictly later layer (HookedTransformer.all_composition_scores)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    tl = tl_weights(params, cfg)
    left = ov_from_tl(tl, cfg)  # writes into the residual stream
    if mode == "V":
        right = left
    else:  # the query side of W_QK reads on the left; K-composition reads on the key side
        right = qk_from_tl(tl, cfg) if mode == "Q" else qk_from_tl(tl, cfg).T
    scores = composition_scores(left, right, broadcast_dims=True)
    layers = torch.arange(cfg.n_layers, device=scores.device)
    later = layers[:, None, None, None] < layers[None, None, :, None]  # [n_layers, 1, n_layers, 1]
    return torch.where(later, scores, torch.zeros_like(scores))
