"""FactoredMatrix and composition scores against dense float64 matrix computations.

Tolerances (tests/tolerance.py): float64 rounding at the values' magnitude; an SVD's error is
p(dims) eps ||A|| (LAPACK) with p a modest polynomial, here sqrt(n) with n = (l + m + r)^2, and
its vectors turn by that over their singular value gap."""

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
    assert fm.shape == (*lead, l, r) and fm.ndim == len(lead) + 2
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
    with pytest.raises(IndexError, match="too many"):
        fm[0, 0, 0, 0, 0]


def test_errors():
    with pytest.raises(ValueError, match="inner"):
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 6))
    with pytest.raises(ValueError, match="broadcast"):
        FactoredMatrix(torch.randn(2, 3, 4), torch.randn(3, 4, 6))
    with pytest.raises(ValueError, match="square"):
        random_fm().BA
    with pytest.raises(AttributeError, match="use .V"):
        random_fm().Vh


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
