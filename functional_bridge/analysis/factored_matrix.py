"""FactoredMatrix: a matrix kept as a product A @ B, with leading batch dims.

A: [..., ldim, mdim], B: [..., mdim, rdim]; the leading dims broadcast. Everything that can be
computed from the factors without forming the [ldim, rdim] product is: the norm and the SVD go
through reduced QR decompositions, A = Qa Ra and B^T = Qb Rb, so that A @ B = Qa (Ra Rb^T) Qb^T
and only the small core Ra Rb^T [.., ka, kb] is decomposed. Pure torch, nothing cached: a
FactoredMatrix over views of the leaves always reflects the leaves' current values.

The interface is TransformerLens's FactoredMatrix (``svd`` returns ``(U, S, V)`` with
``U diag(S) V^T = A @ B``, as TL 3.9 does); the implementation is independent.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


class FactoredMatrix:
    """The matrix A @ B, kept factored. A: [..., ldim, mdim], B: [..., mdim, rdim]."""

    def __init__(self, A: Tensor, B: Tensor):
        if A.dim() < 2 or B.dim() < 2:
            raise ValueError(f"factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"inner dimensions differ: A {tuple(A.shape)} @ B {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as error:
            raise ValueError(f"leading dims do not broadcast: A {tuple(A.shape)}, B {tuple(B.shape)}") from error
        self.A = A.broadcast_to(*lead, *A.shape[-2:])  # [..., ldim, mdim] (a view)
        self.B = B.broadcast_to(*lead, *B.shape[-2:])  # [..., mdim, rdim] (a view)
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.shape = torch.Size((*lead, self.ldim, self.rdim))

    # shape -------------------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        return self.A, self.B

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim})"

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """A new leading dim at position k (k counts over the result's dims, as Tensor.unsqueeze;
        it must land among the leading dims)."""
        position = k if k >= 0 else k + self.ndim + 1
        if not 0 <= position <= self.ndim - 2:
            raise IndexError(f"unsqueeze({k}) must add a leading dim of a FactoredMatrix of shape {tuple(self.shape)}")
        return FactoredMatrix(self.A.unsqueeze(position), self.B.unsqueeze(position))

    def __getitem__(self, index) -> "FactoredMatrix":
        """Index the leading dims; one or two more entries index rows (of A) and columns (of B),
        keeping them as dims (an int i becomes i:i+1)."""
        index = index if isinstance(index, tuple) else (index,)
        n_lead = self.ndim - 2
        extra = sum(entry is not None for entry in index) - n_lead
        if extra <= 0:
            return FactoredMatrix(self.A[index], self.B[index])
        if extra > 2:
            raise IndexError(f"index {index} has too many entries for a FactoredMatrix of shape {tuple(self.shape)}")
        if extra == 1:
            lead, row = index[:-1], _keep_dim(index[-1])
            return FactoredMatrix(self.A[(*lead, row)], self.B[lead])
        lead, row, col = index[:-2], _keep_dim(index[-2]), _keep_dim(index[-1])
        return FactoredMatrix(self.A[(*lead, row)], self.B[(*lead, slice(None), col)])

    # products ----------------------------------------------------------------------------------

    @property
    def AB(self) -> Tensor:
        """The dense product [..., ldim, rdim]."""
        return self.A @ self.B

    @property
    def BA(self) -> Tensor:
        """The reverse product [..., mdim, mdim] (needs ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix, shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.mT, self.A.mT)

    def __matmul__(self, other: Union[Tensor, "FactoredMatrix"]):
        """self @ other: a FactoredMatrix, or a tensor [..., ldim] when other is a vector [rdim]."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() == 1:
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply {tuple(self.shape)} @ {tuple(other.shape)}")
        # keep the inner dimension as small as possible
        if self.mdim < self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor):
        """other @ self: a FactoredMatrix, or a tensor [..., rdim] when other is a vector [ldim]."""
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} @ {tuple(self.shape)}")
        if other.dim() == 1:
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        if self.mdim < self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for products")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # spectra -----------------------------------------------------------------------------------

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U [..., ldim, k], S [..., k], V [..., rdim, k]), k = min(ldim, mdim, rdim), with
        U diag(S) V^T = A @ B and S descending (TransformerLens's convention: V, not V^T)."""
        Qa, core, Qb = _orthogonal_form(self.A, self.B)
        Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
        return Qa @ Uc, S, Qb @ Vhc.mT

    @property
    def U(self) -> Tensor:
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        return self.svd()[1]

    @property
    def V(self) -> Tensor:
        return self.svd()[2]

    @property
    def Vh(self):
        raise AttributeError(
            "FactoredMatrix.Vh is ambiguous (TransformerLens's deprecated Vh returned V): "
            "use .V, or .V.mT for the conjugate transpose"
        )

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues [..., mdim] (complex) of BA: those of AB apart from zeros."""
        BA = self.BA
        if BA.dtype in (torch.float16, torch.bfloat16):  # eig has no 16-bit kernels
            BA = BA.float()
        return torch.linalg.eigvals(BA)

    def norm(self) -> Tensor:
        """Frobenius norm [...]: that of the core Ra Rb^T, since Qa and Qb are orthonormal."""
        return torch.linalg.matrix_norm(_orthogonal_form(self.A, self.B)[1])

    def collapse_l(self) -> Tensor:
        """S V^T [..., k, rdim]: the product with the left orthogonal factor U removed."""
        _, S, V = self.svd()
        return S[..., :, None] * V.mT

    def collapse_r(self) -> Tensor:
        """U S [..., ldim, k]: the product with the right orthogonal factor V removed."""
        U, S, _ = self.svd()
        return U * S[..., None, :]

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S)) @ (sqrt(S) V^T): both factors carry half the spectrum."""
        U, S, V = self.svd()
        root = S.sqrt()
        return FactoredMatrix(U * root[..., None, :], root[..., :, None] * V.mT)

    def get_corner(self, k: int = 3) -> Tensor:
        """The dense top-left k x k corner, with every leading dim cut to its first k too."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.dim()))]


def _keep_dim(entry):
    """An int index as a length-1 slice, so indexing keeps the dim (-1 -> slice(-1, None))."""
    if isinstance(entry, int):
        return slice(entry, entry + 1 if entry != -1 else None)
    return entry


def _orthogonal_form(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Qa [.., ldim, ka], core [.., ka, kb], Qb [.., rdim, kb]) with A @ B = Qa core Qb^T and
    Qa, Qb with orthonormal columns (reduced QR of A and of B^T)."""
    Qa, Ra = torch.linalg.qr(_supported(A))  # Ra: [.., ka, mdim]
    Qb, Rb = torch.linalg.qr(_supported(B).mT)  # Rb: [.., kb, mdim]
    return Qa, Ra @ Rb.mT, Qb


def _supported(x: Tensor) -> Tensor:
    """QR and SVD have no 16-bit kernels: compute those in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
