"""FactoredMatrix and composition scores against dense float64 matrix computations (and TL's
unit-test behaviours: tensor-likes, indexing like the dense product, the per-instance SVD cache).
The comparison with TransformerLens 3.9 itself is tests/parity/test_tl_oracle_factored_matrix.py.

Tolerances (tests/tolerance.py): float64 rounding at the values' magnitude; an SVD's error is
p(dims) eps ||A|| (LAPACK) with p a modest polynomial, here sqrt(n) with n = (l + m + r)^2, and
its vectors turn by that over their singular value gap."""

import gc
import warnings
import weakref

import numpy as np
import pytest
import torch

from functional_bridge.analysis import FactoredMatrix, composition_scores
from tolerance import assert_rounding_close, check, rounding_bound, singular_vector_bound


def roundings(fm) -> int:
    """n for rounding_bound: (ldim + mdim + rdim)^2."""
    return (fm.ldim + fm.mdim + fm.rdim) ** 2


def close(actual, expected, n, what=""):
    assert_rounding_close(actual, expected, n=n, what=what)


def random_fm(lead_a=(), lead_b=(), l=7, m=4, r=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead_a, l, m, generator=gen, dtype=torch.float64)
    B = torch.randn(*lead_b, m, r, generator=gen, dtype=torch.float64)
    return FactoredMatrix(A, B)


SHAPES = [  # (lead A, lead B, ldim, mdim, rdim)
    ((), (), 7, 4, 6),
    ((), (), 5, 9, 6),  # mdim larger than both sides
    ((3,), (), 8, 3, 8),
    ((2, 1), (3,), 6, 4, 9),  # leading dims broadcast
]


@pytest.mark.parametrize("lead_a,lead_b,l,m,r", SHAPES)
def test_shapes_product_and_transpose(lead_a, lead_b, l, m, r):
    fm = random_fm(lead_a, lead_b, l, m, r)
    dense = fm.A @ fm.B
    lead = torch.broadcast_shapes(lead_a, lead_b)
    assert fm.shape == (*lead, l, r) and fm.ndim == len(lead) + 2 and isinstance(fm.shape, torch.Size)
    assert fm.has_leading_dims == bool(lead_a or lead_b)
    assert (fm.ldim, fm.mdim, fm.rdim) == (l, m, r)
    assert torch.equal(fm.AB, dense)
    assert torch.equal(fm.T.AB, (fm.B.mT @ fm.A.mT))
    close(fm.T.AB, dense.mT, m)
    assert fm.pair[0] is fm.A and fm.pair[1] is fm.B
    if l == r:
        assert torch.equal(fm.BA, fm.B @ fm.A)


@pytest.mark.parametrize("lead_a,lead_b,l,m,r", SHAPES)
def test_svd_norm_and_collapses_match_the_dense_svd(lead_a, lead_b, l, m, r):
    """Singular vectors have arbitrary signs, so the checks are on invariants: the singular
    values, the reconstruction, the Gram matrices, and |U_ours^T U_dense| = I."""
    fm = random_fm(lead_a, lead_b, l, m, r)
    dense = fm.AB
    k = min(l, m, r)
    U, S, V = fm.svd()
    assert U.shape == (*fm.shape[:-2], l, k) and S.shape == (*fm.shape[:-2], k) and V.shape == (*fm.shape[:-2], r, k)
    dense_S = torch.linalg.svdvals(dense)[..., :k]
    n = roundings(fm)
    close(S, dense_S, n, "S")
    close(U @ torch.diag_embed(S) @ V.mT, dense, n, "U S V^T")
    eye = torch.eye(k, dtype=torch.float64)
    close(U.mT @ U, eye.expand(*S.shape[:-1], k, k), n, "U orthonormal")
    close(V.mT @ V, eye.expand(*S.shape[:-1], k, k), n, "V orthonormal")
    dense_U, _, dense_Vh = torch.linalg.svd(dense, full_matrices=False)
    vector_bound = 2 * singular_vector_bound(dense_S, torch.float64, n)  # ours and the dense SVD's, over the gaps
    check(((U.mT @ dense_U[..., :k]).abs() - eye).abs().max().item(), vector_bound, "U up to sign")
    check(((V.mT @ dense_Vh[..., :k, :].mT).abs() - eye).abs().max().item(), vector_bound, "V up to sign")
    close(fm.norm(), torch.linalg.matrix_norm(dense), n, "norm")
    left, right = fm.collapse_l(), fm.collapse_r()  # S V^T [k, r], U S [l, k]
    assert left.shape == (*fm.shape[:-2], k, r) and right.shape == (*fm.shape[:-2], l, k)
    close(left.mT @ left, dense.mT @ dense, n, "collapse_l")
    close(right @ right.mT, dense @ dense.mT, n, "collapse_r")
    close(U @ left, dense, n, "U collapse_l")
    close(right @ V.mT, dense, n, "collapse_r V^T")
    even = fm.make_even()
    close(even.AB, dense, n, "make_even")
    close(even.A.mT @ even.A, torch.diag_embed(S), n, "make_even A")
    close(even.B @ even.B.mT, torch.diag_embed(S), n, "make_even B")
    assert torch.equal(fm.U, U) and torch.equal(fm.S, S) and torch.equal(fm.V, V)


def test_eigenvalues_are_those_of_the_dense_product():
    fm = random_fm((2,), (), 8, 3, 8, seed=1)
    ours = fm.eigenvalues  # [2, mdim]
    assert ours.shape == (2, 3) and ours.is_complex()
    dense = torch.linalg.eigvals(fm.AB)  # [2, 8]: ours plus five zeros
    for batch in range(2):
        distance = (ours[batch][:, None] - dense[batch][None, :]).abs()
        bound = rounding_bound(dense[batch].abs().max().item(), torch.float64, roundings(fm))
        check(distance.min(1).values.max().item(), bound, "ours among AB's")  # each of ours is an eigenvalue of AB
        zeros = dense[batch][distance.min(0).values > bound]
        assert len(zeros) == 5
        check(zeros.abs().max().item(), bound, "the rest are zero")


def test_matmul_with_vectors_matrices_and_factored_matrices():
    fm = random_fm((3,), (), 7, 4, 6)
    dense = fm.AB
    gen = torch.Generator().manual_seed(5)
    v_right, v_left = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    n = 9 * roundings(fm)  # products of products: two or three chains of dot products
    assert (fm @ v_right).shape == (3, 7) and (v_left @ fm).shape == (3, 6)
    close(fm @ v_right, dense @ v_right, n, "@ vector")
    close(v_left @ fm, v_left @ dense, n, "vector @")
    for cols in (2, 9):  # keeps the smaller inner dim: B @ M when mdim < rdim, else AB, M
        M = torch.randn(6, cols, generator=gen, dtype=torch.float64)
        product = fm @ M
        assert isinstance(product, FactoredMatrix) and product.mdim == 4
        close(product.AB, dense @ M, n, f"@ matrix {cols}")
    for rows in (2, 9):
        M = torch.randn(rows, 7, generator=gen, dtype=torch.float64)
        product = M @ fm
        assert isinstance(product, FactoredMatrix) and product.mdim == 4
        close(product.AB, M @ dense, n, f"matrix {rows} @")
    wide = random_fm((), (), 3, 5, 2, seed=2)  # mdim > ldim, rdim: the product's dims are the inner ones
    M_right, M_left = torch.randn(2, 4, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    assert (wide @ M_right).mdim == 2 and (M_left @ wide).mdim == 3
    close((wide @ M_right).AB, wide.AB @ M_right, n, "wide @")
    close((M_left @ wide).AB, M_left @ wide.AB, n, "@ wide")
    other = random_fm((), (), 6, 2, 5, seed=3)
    chained = fm @ other
    assert isinstance(chained, FactoredMatrix)
    close(chained.AB, dense @ other.AB, n, "chained")
    close((fm * 2.5).AB, 2.5 * dense, n, "* 2.5")
    close((2.5 * fm).AB, 2.5 * dense, n, "2.5 *")


def test_indexing_unsqueeze_and_corner():
    fm = random_fm((3, 4), (), 7, 2, 6)
    dense = fm.AB
    assert fm[1].shape == (4, 7, 6)
    n = fm.mdim  # indexing then the same products
    close(fm[1].AB, dense[1], n)
    close(fm[:, 2].AB, dense[:, 2], n)
    close(fm[1, 2, 3].AB, dense[1, 2, 3:4], n)  # a row index keeps its dim
    close(fm[1, 2, -1, 4].AB, dense[1, 2, -1:, 4:5], n)
    close(fm[0, 1:3, 2:5, :4].AB, dense[0, 1:3, 2:5, :4], n)
    assert fm.unsqueeze(1).shape == (3, 1, 4, 7, 6) and fm.unsqueeze(-3).shape == (3, 4, 1, 7, 6)
    with pytest.raises(IndexError):
        fm.unsqueeze(-1)  # would split the matrix dims
    assert torch.equal(fm.get_corner(2), dense[:2, :2, :2, :2])
    with pytest.raises(ValueError, match="too long an index"):
        fm[0, 0, 0, 0, 0]
    with pytest.raises(IndexError, match="single ellipsis"):
        fm[..., ...]


def keep_dims(index: tuple, n_lead: int) -> tuple:
    """The dense equivalent of a FactoredMatrix index: ints at the matrix dims as length-1 slices."""
    index = list(index)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index[at : at + 1] = [slice(None)] * (n_lead + 2 - sum(e is not None for e in index if e is not Ellipsis))
    consumed = 0
    for i, entry in enumerate(index):
        if entry is None:
            continue
        if consumed >= n_lead and isinstance(entry, int):
            index[i] = slice(entry, entry + 1 if entry != -1 else None)
        consumed += 1
    return tuple(index)


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize(
    "index",
    [(...,), (..., 1), (..., -1), (..., 1, slice(None)), (..., -1, slice(None)), (..., slice(1, 4), slice(2, 6)),
     (None, ..., slice(1, 4), slice(None)), (..., torch.tensor([1, 4])), (..., [1, 3], slice(None)), (..., np.array([0, 2]), -2)],
)  # fmt: skip
def test_indexing_with_an_ellipsis_equals_the_dense_product(lead, index):
    """Rows and columns of unequal sizes (and a hidden dim of 2), so a misplaced entry shows."""
    fm = random_fm(lead, lead, 5, 2, 7)
    result = fm[index]
    expected_index = keep_dims(tuple(torch.as_tensor(e) if isinstance(e, (list, np.ndarray)) else e for e in index), len(lead))
    assert result.mdim == 2
    close(result.AB, fm.AB[expected_index], roundings(fm), str(index))


def test_indexing_with_masks_and_index_sequences():
    fm = random_fm((2, 3), (2, 3), 5, 2, 7)
    dense, n = fm.AB, roundings(fm)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    for form in (mask, mask.numpy(), mask.tolist()):
        close(fm[form].AB, dense[mask], n)
        close(fm[form, ..., 1].AB, dense[mask][..., 1:2], n)
    close(fm[torch.tensor([True, False]), ..., 1, :].AB, dense[torch.tensor([True, False])][..., 1:2, :], n)
    close(fm[[1, 0], ..., 1].AB, dense[[1, 0]][..., 1:2], n)  # a list consumes one dim
    close(fm[:, :, [0, 1], [0]].AB, dense[:, :, [0, 1]][..., [0]], n)  # rows, then columns (not zipped)
    close(fm[torch.tensor([1, 0]), ..., 3].AB, dense[[1, 0], :, :, 3:4], n)
    with pytest.raises(IndexError, match="span the matrix dims"):
        random_fm((2,), (2,), 5, 2, 7)[torch.ones(2, 5, dtype=torch.bool)]


def test_index_forms_of_transformer_lens_unit_tests():
    """The rest of TL's index checklist (tests/unit/factored_matrix/test_get_item.py): masks as
    nested tuples and legacy uint8 masks (torch's deprecation warning kept), nested integer
    sequences consuming one dim, an ellipsis of zero width, an index too long past an
    ellipsis; slicing never forms the product."""
    fm = random_fm((2, 3), (2, 3), 5, 2, 7)
    dense, n = fm.AB, roundings(fm)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    close(fm[tuple(tuple(row) for row in mask.tolist()), ..., 1].AB, dense[mask][..., 1:2], n)
    close(fm[(True, False), ..., 1].AB, dense[torch.tensor([True, False])][..., 1:2], n)
    for byte_mask in (mask.to(torch.uint8), mask.to(torch.uint8).numpy()):
        with pytest.warns(UserWarning, match="uint8"):
            close(fm[byte_mask, ...].AB, dense[mask], n)
    for nested in ([[1, 0], [0, 1]], ((1, 0), (0, 1))):
        close(fm[nested, ..., 1].AB, dense[torch.tensor(nested), ..., 1:2], n)
    flat = random_fm((), (), 5, 2, 7)
    close(flat[1, ..., 2].AB, flat.AB[1:2, 2:3], roundings(flat))
    with pytest.raises(ValueError, match="too long an index"):
        flat[..., 0, 0, 0]
    forbidden = property(lambda self: pytest.fail("indexing formed the product"))
    original = FactoredMatrix.AB
    try:
        FactoredMatrix.AB = forbidden
        sliced = fm[..., 1:4, 2:6]
    finally:
        FactoredMatrix.AB = original
    close(sliced.AB, dense[..., 1:4, 2:6], n)


class Wrapped:
    """A tensor-like that is not a Tensor (TL's TensorLike protocol): ndim, shape, size(dim),
    unsqueeze, squeeze, broadcast_to and @, each returning a Wrapped."""

    def __init__(self, tensor):
        self.tensor = tensor

    ndim = property(lambda self: self.tensor.ndim)
    shape = property(lambda self: self.tensor.shape)

    def size(self, dim=None):
        return self.tensor.size() if dim is None else self.tensor.size(dim)

    def unsqueeze(self, dim):
        return Wrapped(self.tensor.unsqueeze(dim))

    def squeeze(self, dim):
        return Wrapped(self.tensor.squeeze(dim))

    def broadcast_to(self, shape):
        return Wrapped(self.tensor.broadcast_to(shape))

    def __matmul__(self, other):
        if not isinstance(other, (torch.Tensor, Wrapped)):  # a FactoredMatrix (ours or TL's) answers
            return NotImplemented
        return Wrapped(self.tensor @ (other.tensor if isinstance(other, Wrapped) else other))

    def __rmatmul__(self, other):
        return Wrapped(other @ self.tensor)


def test_products_with_tensor_likes():
    fm = random_fm((), (), 3, 4, 5)
    gen = torch.Generator().manual_seed(2)
    right, left, vector = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((5, 6), (2, 3), (5,)))
    for product, expected in ((fm @ Wrapped(right), fm.AB @ right), (Wrapped(left) @ fm, left @ fm.AB)):
        assert isinstance(product, FactoredMatrix) and isinstance(product.AB, Wrapped)
        close(product.AB.tensor, expected, roundings(fm))
    collapsed = fm @ Wrapped(vector)
    assert isinstance(collapsed, Wrapped)
    close(collapsed.tensor, fm.AB @ vector, roundings(fm))
    built = FactoredMatrix(Wrapped(fm.A), fm.B)  # a tensor-like factor
    assert isinstance(built.AB, Wrapped)
    close(built.AB.tensor, fm.AB, roundings(fm))
    with pytest.raises(TypeError, match="torch.as_tensor"):
        fm @ right.numpy()
    with pytest.raises(TypeError, match="torch.as_tensor"):
        left.numpy() @ fm
    with pytest.raises(TypeError, match="tensor-like"):
        FactoredMatrix([[1.0]], fm.B)


def test_svd_is_cached_until_a_factor_changes():
    """Repeated calls return the same tensors (TL caches per instance); an in-place edit of the
    tensor a factor views (an optimizer step on a leaf) invalidates it; the cache does not keep
    the instance alive."""
    leaf = torch.randn(7, 4, dtype=torch.float64)
    fm = FactoredMatrix(leaf[:, :3], torch.randn(3, 5, dtype=torch.float64))
    first = fm.svd()
    assert all(a is b for a, b in zip(first, fm.svd())) and fm.S is first[1]
    with torch.no_grad():
        leaf.mul_(2)
    close(fm.S, 2 * first[1], roundings(fm), "S after the edit")
    close(fm.norm(), torch.linalg.matrix_norm(fm.AB), roundings(fm), "norm after the edit")
    ref = weakref.ref(fm)
    del fm, first
    gc.collect()
    assert ref() is None


def test_sixteen_bit_factors_are_decomposed_in_float32():
    """SVD and eig have no 16-bit kernels (TL's svd fails on them): the spectra come back in
    float32, equal to float64's on the same (rounded) values to float32 precision."""
    fm64 = random_fm((2,), (), 6, 3, 6, seed=5)
    half = FactoredMatrix(fm64.A.bfloat16(), fm64.B.bfloat16())
    exact = FactoredMatrix(half.A.double(), half.B.double())  # the same values, float64
    assert half.S.dtype == torch.float32 and half.eigenvalues.dtype == torch.complex64
    n = roundings(exact)
    assert_rounding_close(half.S, exact.S, n=n, scale=exact.S.max().item(), dtype=torch.float32, what="S")
    assert_rounding_close(half.norm(), exact.norm(), n=n, dtype=torch.float32, what="norm")
    assert_rounding_close(half.make_even().AB, exact.AB, n=n, dtype=torch.float32, what="make_even")


def test_errors():
    with pytest.raises(ValueError, match="inner"):
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="[Mm]ismatch"):
        FactoredMatrix(torch.randn(2, 3, 4), torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match="square"):
        random_fm().BA
    with pytest.raises(ValueError, match="scalar"):
        random_fm() * torch.ones(2)
    fm = random_fm()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(fm.Vh, fm.V)  # TL's deprecated alias of V
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)


def test_float32_matches_float64_to_float32_precision():
    fm64 = random_fm((2,), (), 12, 5, 10, seed=4)
    fm32 = FactoredMatrix(fm64.A.float(), fm64.B.float())
    # singular values and norms are perfectly conditioned: each moves by at most the rounding
    assert_rounding_close(fm32.S, fm64.S, n=roundings(fm64), scale=fm64.S.max().item(), what="S")
    assert_rounding_close(fm32.norm(), fm64.norm(), n=roundings(fm64), what="norm")


def test_composition_scores_are_the_dense_frobenius_ratio():
    """||W_left W_right||_F / (||W_left||_F ||W_right||_F) for every pair (broadcast_dims=True)
    or matching pairs (False)."""
    left = random_fm((2, 3), (), 8, 3, 8, seed=6)
    right = random_fm((4,), (), 8, 2, 8, seed=7)
    scores = composition_scores(left, right)
    assert scores.shape == (2, 3, 4)
    L, R = left.AB, right.AB
    fro = torch.linalg.matrix_norm
    for i in range(2):
        for j in range(3):
            for k in range(4):
                expected = fro(L[i, j] @ R[k]) / (fro(L[i, j]) * fro(R[k]))
                close(scores[i, j, k], expected, 2 * 8**2)  # dot products, then 8^2 squares summed
    paired = composition_scores(random_fm((3,), (), 8, 3, 8, seed=8), random_fm((3,), (), 8, 2, 8, seed=9), broadcast_dims=False)
    L, R = random_fm((3,), (), 8, 3, 8, seed=8).AB, random_fm((3,), (), 8, 2, 8, seed=9).AB
    close(paired, fro(L @ R) / (fro(L) * fro(R)), 2 * 8**2)
    with pytest.raises(ValueError, match="rdim"):
        composition_scores(random_fm((), (), 8, 3, 6), random_fm((), (), 8, 3, 8))
