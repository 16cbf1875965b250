"""FactoredMatrix: a matrix kept as a product A @ B, with leading batch dims (TransformerLens 3.9's).

A: [..., ldim, mdim], B: [..., mdim, rdim]; the leading dims broadcast. Products, indexing,
the SVD, the norm and the eigenvalues are computed from the factors without forming the
[ldim, rdim] product. The SVD is TL's construction (the SVDs of A and of B, then of the small
core diag(Sa) Va^T Ub diag(Sb)), so U, S, V, collapse_l/r and make_even equal TL's, signs
included, on the same inputs. It is cached per instance while A and B are unchanged (their
version counters), so a FactoredMatrix over views of the leaves never answers from a stale SVD.

Beyond TL 3.9, on purpose: 16-bit factors are decomposed in float32 (TL's SVD has no 16-bit
kernel and fails); indexing with ``...``, boolean masks and index sequences follows the dense
product's semantics (TL 3.9 mis-assigns entries after an Ellipsis); bad shapes raise ValueError
naming both shapes (TL asserts).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

_TENSOR_LIKE = ("ndim", "shape", "size", "unsqueeze", "squeeze", "broadcast_to", "__matmul__")


class FactoredMatrix:
    """The matrix A @ B, kept factored. A: [..., ldim, mdim], B: [..., mdim, rdim].

    A and B may be Tensors or tensor-likes (objects with ``ndim``, ``shape``, ``size(dim)``,
    ``unsqueeze``, ``squeeze``, ``broadcast_to`` and ``@``, as TL's TensorLike protocol);
    tensor-likes support the products (``@``, ``AB``, ``BA``), as in TL."""

    __array_ufunc__ = None  # numpy defers to our reflected operators instead of wrapping us

    def __init__(self, A, B):
        for name, factor in (("A", A), ("B", B)):
            missing = [attr for attr in _TENSOR_LIKE if not hasattr(factor, attr)]
            if missing:
                raise TypeError(f"factor {name} must be a Tensor or tensor-like; {type(factor).__name__} lacks {missing}")
            if factor.ndim < 2:
                raise ValueError(f"factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
        if A.size(-1) != B.size(-2):
            raise ValueError(f"Factored matrix must match on inner dimension: A {tuple(A.shape)} @ B {tuple(B.shape)}")
        try:
            lead = torch.broadcast_shapes(tuple(A.shape[:-2]), tuple(B.shape[:-2]))
        except RuntimeError as error:
            raise ValueError(
                f"Shape mismatch: the leading dims of A {tuple(A.shape)} and B {tuple(B.shape)} do not broadcast"
            ) from error
        self.ldim, self.mdim, self.rdim = A.size(-2), A.size(-1), B.size(-1)
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        self.shape = torch.Size((*lead, self.ldim, self.rdim))
        self.A = A.broadcast_to(torch.Size((*lead, self.ldim, self.mdim)))  # [..., ldim, mdim] (a view)
        self.B = B.broadcast_to(torch.Size((*lead, self.mdim, self.rdim)))  # [..., mdim, rdim] (a view)
        self._svd_memo = None

    # shape -------------------------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple:
        return self.A, self.B

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """A new leading dim at position k (k counts over the result's dims, as Tensor.unsqueeze;
        it must land among the leading dims)."""
        position = k if k >= 0 else k + self.ndim + 1
        if not 0 <= position <= self.ndim - 2:
            raise IndexError(f"unsqueeze({k}) must add a leading dim of a FactoredMatrix of shape {tuple(self.shape)}")
        return FactoredMatrix(self.A.unsqueeze(position), self.B.unsqueeze(position))

    def __getitem__(self, index) -> "FactoredMatrix":
        """Index the leading dims; up to two more entries index rows (of A) and columns (of B),
        keeping them as dims (an int i becomes i:i+1). ``...`` stands for the dims not named, so
        ``fm[..., 1]`` is column 1 and ``fm[..., 1, :]`` row 1, as on the dense product."""
        lead, row, column = _split_index(index, self.ndim, self.shape)
        A = self.A[(*lead, Ellipsis)]
        B = self.B[(*lead, Ellipsis)]
        if row is not None:
            A = A[..., _keep_dim(row), :]
        if column is not None:
            B = B[..., :, _keep_dim(column)]
        return FactoredMatrix(A, B)

    # products ----------------------------------------------------------------------------------

    @property
    def AB(self):
        """The dense product [..., ldim, rdim]."""
        return self.A @ self.B

    @property
    def BA(self):
        """The reverse product [..., mdim, mdim] (needs ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs ldim == rdim (a square matrix), shape is {tuple(self.shape)}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def __matmul__(self, other):
        """self @ other: a FactoredMatrix, or a tensor [..., ldim] when other is a vector [rdim].
        The product keeps the smaller inner dimension (B @ other when mdim < rdim)."""
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        _check_operand(other, "@")
        if other.ndim < 2:  # a vector: collapse to a vector
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.size(-2) != self.rdim:
            raise ValueError(f"cannot multiply {tuple(self.shape)} @ {tuple(other.shape)}: inner dimensions differ")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        """other @ self: a FactoredMatrix, or a tensor [..., rdim] when other is a vector [ldim]."""
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        _check_operand(other, "@")
        if other.size(-1) != self.ldim:
            raise ValueError(f"cannot multiply {tuple(other.shape)} @ {tuple(self.shape)}: inner dimensions differ")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        """Scalar multiple (the scalar scales A)."""
        if isinstance(scalar, Tensor) and scalar.numel() != 1:
            raise ValueError(f"* takes a scalar, got a tensor of shape {tuple(scalar.shape)}; use @ for products")
        if not isinstance(scalar, (int, float, Tensor)):
            return NotImplemented
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # spectra -----------------------------------------------------------------------------------

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """(U [..., ldim, k], S [..., k], V [..., rdim, k]), k = min(ldim, mdim, rdim), with
        U diag(S) V^T = A @ B and S descending (TL's convention: V, not V^T)."""
        key = _version_key(self.A, self.B)
        if key is None or self._svd_memo is None or not _same_key(self._svd_memo[0], key):
            result = _factored_svd(self.A, self.B)
            if key is None:
                return result
            self._svd_memo = (key, result)
        return self._svd_memo[1]

    @property
    def U(self) -> Tensor:
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        return self.svd()[1]

    @property
    def V(self) -> Tensor:
        """Right singular vectors: A @ B = U diag(S) V^T."""
        return self.svd()[2]

    @property
    def Vh(self) -> Tensor:
        """TL's deprecated alias of V (it returns V, not V^T)."""
        warnings.warn(
            "FactoredMatrix.Vh returns V (the right singular vectors), as TransformerLens's deprecated alias "
            "does; use .V, or .V.transpose(-2, -1) for V^T",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues [..., mdim] (complex) of BA: those of AB apart from zeros."""
        BA = _supported(self.BA)  # eig has no 16-bit kernels
        return torch.linalg.eig(BA).eigenvalues

    def norm(self) -> Tensor:
        """Frobenius norm [...]: sqrt of the sum of the squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def collapse_l(self) -> Tensor:
        """S V^T [..., k, rdim]: the product with the left orthogonal factor U removed."""
        return self.S[..., :, None] * self.V.transpose(-2, -1)

    def collapse_r(self) -> Tensor:
        """U S [..., ldim, k]: the product with the right orthogonal factor V removed."""
        return self.U * self.S[..., None, :]

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S)) @ (sqrt(S) V^T): both factors carry half the spectrum."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.transpose(-2, -1))

    def get_corner(self, k: int = 3) -> Tensor:
        """The dense top-left k x k corner, with every leading dim cut to its first k too."""
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.ndim))]


def _factored_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD of A @ B from those of A and B: A @ B = Ua (diag(Sa) Va^T Ub diag(Sb)) Vb^T, and
    the core [.., ka, kb] is small."""
    A, B = _supported(A), _supported(B)
    Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)  # [.., ldim, ka], [.., ka], [.., ka, mdim]
    Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)  # [.., mdim, kb], [.., kb], [.., kb, rdim]
    core = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]  # ((diag(Sa) Va^T) @ Ub) diag(Sb)
    Uc, S, Vhc = torch.linalg.svd(core, full_matrices=False)
    return Ua @ Uc, S, Vhb.transpose(-2, -1) @ Vhc.transpose(-2, -1)


def _version_key(A, B):
    """What identifies the factors' current values: the tensors and their version counters
    (shared with the leaves they view, so an in-place step changes it). None: do not cache."""
    try:
        return (A, A._version, B, B._version)
    except (AttributeError, RuntimeError):  # tensor-likes; inference tensors have no counter
        return None


def _same_key(a, b) -> bool:
    return a[0] is b[0] and a[1] == b[1] and a[2] is b[2] and a[3] == b[3]


def _supported(x: Tensor) -> Tensor:
    """SVD, QR and eig have no 16-bit kernels: compute those in float32."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_operand(other, op: str) -> None:
    if isinstance(other, Tensor):
        return
    missing = [attr for attr in ("ndim", "size", "unsqueeze", "squeeze", "__matmul__") if not hasattr(other, attr)]
    if missing or not callable(other.size):
        raise TypeError(
            f"FactoredMatrix {op} {type(other).__name__}: expected a Tensor, a FactoredMatrix or a tensor-like "
            f"(ndim, size(dim), unsqueeze, squeeze, @); convert arrays with torch.as_tensor"
        )


def _keep_dim(entry):
    """An int index as a length-1 slice, so indexing keeps the dim (-1 -> slice(-1, None))."""
    if isinstance(entry, int):
        return slice(entry, entry + 1 if entry != -1 else None)
    return entry


def _as_index(entry):
    """Sequences and arrays as index tensors (so the dims they consume can be counted)."""
    if isinstance(entry, (list, tuple)) or type(entry).__module__ == "numpy":
        tensor = torch.as_tensor(entry)
        return tensor.long() if tensor.numel() == 0 else tensor
    return entry


def _dims_consumed(entry) -> int:
    if entry is None or entry is Ellipsis:
        return 0
    if isinstance(entry, Tensor) and entry.dtype in (torch.bool, torch.uint8):
        return max(entry.ndim, 1)
    return 1


def _split_index(index, ndim: int, shape) -> tuple[list, object, object]:
    """(leading entries, row entry or None, column entry or None) of an index into a
    FactoredMatrix of ``ndim`` dims: entries are matched to dims left to right, ``...`` taking
    the dims no entry names."""
    entries = [_as_index(entry) for entry in (index if isinstance(index, tuple) else (index,))]
    if sum(entry is Ellipsis for entry in entries) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    named = sum(_dims_consumed(entry) for entry in entries)
    if named > ndim:
        raise ValueError(f"{index} is too long an index for a FactoredMatrix with shape {tuple(shape)}")
    at = next((i for i, entry in enumerate(entries) if entry is Ellipsis), None)
    if at is not None:
        entries[at : at + 1] = [slice(None)] * (ndim - named)
    n_lead, used = ndim - 2, 0
    lead, matrix = [], []
    for entry in entries:
        consumed = _dims_consumed(entry)
        if not matrix and used + consumed <= n_lead:
            lead.append(entry)
        elif used < n_lead or consumed != 1:
            raise IndexError(f"index {index}: a mask or new axis cannot span the matrix dims of shape {tuple(shape)}")
        else:
            matrix.append(entry)
        used += consumed
    row = matrix[0] if matrix else None
    column = matrix[1] if len(matrix) > 1 else None
    return lead, row, column
