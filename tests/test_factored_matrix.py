"""FactoredMatrix and composition scores against dense float64 matrix computations."""

import pytest
import torch

from functional_bridge.analysis import FactoredMatrix, composition_scores

TOL = 1e-10  # float64: the dense oracle and the factored computation agree to rounding


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


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
    assert torch.equal(fm.T.AB, (fm.B.mT @ fm.A.mT)) and rel(fm.T.AB, dense.mT) < TOL
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
    assert rel(S, dense_S) < TOL
    assert rel(U @ torch.diag_embed(S) @ V.mT, dense) < TOL
    eye = torch.eye(k, dtype=torch.float64)
    assert (U.mT @ U - eye).abs().max() < TOL and (V.mT @ V - eye).abs().max() < TOL
    dense_U, _, dense_Vh = torch.linalg.svd(dense, full_matrices=False)
    assert ((U.mT @ dense_U[..., :k]).abs() - eye).abs().max() < 1e-8  # same vectors up to sign
    assert ((V.mT @ dense_Vh[..., :k, :].mT).abs() - eye).abs().max() < 1e-8
    assert rel(fm.norm(), torch.linalg.matrix_norm(dense)) < TOL
    left, right = fm.collapse_l(), fm.collapse_r()  # S V^T [k, r], U S [l, k]
    assert left.shape == (*fm.shape[:-2], k, r) and right.shape == (*fm.shape[:-2], l, k)
    assert rel(left.mT @ left, dense.mT @ dense) < TOL
    assert rel(right @ right.mT, dense @ dense.mT) < TOL
    assert rel(U @ left, dense) < TOL and rel(right @ V.mT, dense) < TOL
    even = fm.make_even()
    assert rel(even.AB, dense) < TOL
    assert rel(even.A.mT @ even.A, torch.diag_embed(S)) < TOL and rel(even.B @ even.B.mT, torch.diag_embed(S)) < TOL
    assert rel(fm.U, U) < TOL and rel(fm.S, S) < TOL and rel(fm.V, V) < TOL


def test_eigenvalues_are_those_of_the_dense_product():
    fm = random_fm((2,), (), 8, 3, 8, seed=1)
    ours = fm.eigenvalues  # [2, mdim]
    assert ours.shape == (2, 3) and ours.is_complex()
    dense = torch.linalg.eigvals(fm.AB)  # [2, 8]: ours plus five zeros
    for batch in range(2):
        distance = (ours[batch][:, None] - dense[batch][None, :]).abs()
        assert distance.min(1).values.max() < 1e-9  # each of ours is an eigenvalue of AB
        zeros = dense[batch][distance.min(0).values > 1e-6]
        assert len(zeros) == 5 and zeros.abs().max() < 1e-9  # the rest are zero


def test_matmul_with_vectors_matrices_and_factored_matrices():
    fm = random_fm((3,), (), 7, 4, 6)
    dense = fm.AB
    gen = torch.Generator().manual_seed(5)
    v_right, v_left = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    assert rel(fm @ v_right, dense @ v_right) < TOL and (fm @ v_right).shape == (3, 7)
    assert rel(v_left @ fm, v_left @ dense) < TOL and (v_left @ fm).shape == (3, 6)
    for cols in (2, 9):  # keeps the smaller inner dim: B @ M when mdim < rdim, else AB, M
        M = torch.randn(6, cols, generator=gen, dtype=torch.float64)
        product = fm @ M
        assert isinstance(product, FactoredMatrix) and rel(product.AB, dense @ M) < TOL
        assert product.mdim == 4
    for rows in (2, 9):
        M = torch.randn(rows, 7, generator=gen, dtype=torch.float64)
        product = M @ fm
        assert isinstance(product, FactoredMatrix) and rel(product.AB, M @ dense) < TOL
        assert product.mdim == 4
    wide = random_fm((), (), 3, 5, 2, seed=2)  # mdim > ldim, rdim: the product's dims are the inner ones
    M_right, M_left = torch.randn(2, 4, generator=gen, dtype=torch.float64), torch.randn(4, 3, generator=gen, dtype=torch.float64)
    assert (wide @ M_right).mdim == 2 and rel((wide @ M_right).AB, wide.AB @ M_right) < TOL
    assert (M_left @ wide).mdim == 3 and rel((M_left @ wide).AB, M_left @ wide.AB) < TOL
    other = random_fm((), (), 6, 2, 5, seed=3)
    chained = fm @ other
    assert isinstance(chained, FactoredMatrix) and rel(chained.AB, dense @ other.AB) < TOL
    assert rel((fm * 2.5).AB, 2.5 * dense) < TOL and rel((2.5 * fm).AB, 2.5 * dense) < TOL


def test_indexing_unsqueeze_and_corner():
    fm = random_fm((3, 4), (), 7, 2, 6)
    dense = fm.AB
    assert rel(fm[1].AB, dense[1]) < TOL and fm[1].shape == (4, 7, 6)
    assert rel(fm[:, 2].AB, dense[:, 2]) < TOL
    assert rel(fm[1, 2, 3].AB, dense[1, 2, 3:4]) < TOL  # a row index keeps its dim
    assert rel(fm[1, 2, -1, 4].AB, dense[1, 2, -1:, 4:5]) < TOL
    assert rel(fm[0, 1:3, 2:5, :4].AB, dense[0, 1:3, 2:5, :4]) < TOL
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
    assert rel(fm32.S.double(), fm64.S) < 1e-5
    assert rel(fm32.norm().double(), fm64.norm()) < 1e-6


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
                assert abs(scores[i, j, k] - expected) / expected < TOL
    paired = composition_scores(random_fm((3,), (), 8, 3, 8, seed=8), random_fm((3,), (), 8, 2, 8, seed=9), broadcast_dims=False)
    L, R = random_fm((3,), (), 8, 3, 8, seed=8).AB, random_fm((3,), (), 8, 2, 8, seed=9).AB
    assert rel(paired, fro(L @ R) / (fro(L) * fro(R))) < TOL
    with pytest.raises(ValueError, match="rdim"):
        composition_scores(random_fm((), (), 8, 3, 6), random_fm((), (), 8, 3, 8))
