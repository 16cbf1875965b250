"""FactoredMatrix and composition_scores against TransformerLens 3.9's, on random inputs.

Where a result depends on the arbitrary signs of singular vectors (U, V, collapse_l,
collapse_r, make_even's factors) the comparison is on invariants: singular values, products,
Gram matrices, and |U_ours^T U_TL| = I (each vector equal up to sign; the random spectra have
well-separated singular values, so the vectors are determined up to sign)."""

import pytest
import torch

from functional_bridge.analysis import FactoredMatrix, composition_scores

pytestmark = pytest.mark.oracle

CASES = [  # (lead A, lead B, ldim, mdim, rdim)
    ((), (), 9, 4, 7),
    ((3,), (3,), 8, 5, 8),
    ((2, 1), (3,), 6, 3, 10),
    ((4,), (), 5, 8, 6),  # mdim larger than ldim and rdim
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def pair(case, dtype, seed=0):
    lead_a, lead_b, l, m, r = case
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead_a, l, m, generator=gen, dtype=torch.float64).to(dtype)
    B = torch.randn(*lead_b, m, r, generator=gen, dtype=torch.float64).to(dtype)
    return A, B


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def TLFactoredMatrix(transformer_lens):
    from transformer_lens.FactoredMatrix import FactoredMatrix as TL

    return TL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_products_shapes_and_indexing_equal_transformer_lens(TLFactoredMatrix, case, dtype):
    tol = TOLERANCE[dtype]
    A, B = pair(case, dtype)
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    assert ours.shape == theirs.shape and ours.ndim == theirs.ndim
    assert (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)
    assert [x.shape for x in ours.pair] == [x.shape for x in theirs.pair]
    assert torch.equal(ours.AB, theirs.AB) and torch.equal(ours.T.AB, theirs.T.AB)
    if ours.ldim == ours.rdim:
        assert torch.equal(ours.BA, theirs.BA)
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    right_vector, left_vector = rand(ours.rdim), rand(ours.ldim)
    assert rel(ours @ right_vector, theirs @ right_vector) <= tol
    assert rel(left_vector @ ours, left_vector @ theirs) <= tol
    for n in (2, 11):
        right_matrix, left_matrix = rand(ours.rdim, n), rand(n, ours.ldim)
        for mine, tl in ((ours @ right_matrix, theirs @ right_matrix), (left_matrix @ ours, left_matrix @ theirs)):
            assert mine.mdim == tl.mdim and mine.shape == tl.shape
            assert rel(mine.AB, tl.AB) <= tol
    other_A, other_B = rand(ours.rdim, 3), rand(3, 4)
    chained, tl_chained = ours @ FactoredMatrix(other_A, other_B), theirs @ TLFactoredMatrix(other_A, other_B)
    assert chained.shape == tl_chained.shape and chained.mdim == tl_chained.mdim
    assert rel(chained.AB, tl_chained.AB) <= tol
    assert torch.equal((ours * 3.0).AB, (theirs * 3.0).AB)
    assert torch.equal(ours.get_corner(), theirs.get_corner())
    assert torch.equal(ours.get_corner(2), theirs.get_corner(2))
    n_lead = ours.ndim - 2
    indices = [(0,), (slice(1, None),), (None,)] if n_lead else []
    indices += [(*(0,) * n_lead, 2), (*(0,) * n_lead, -1, slice(1, 3)), (*(slice(None),) * n_lead, slice(0, 2), -1)]
    for index in indices:
        mine, tl = ours[index], theirs[index]
        assert mine.shape == tl.shape, index
        assert torch.equal(mine.AB, tl.AB), index
    for k in range(n_lead + 1):
        assert ours.unsqueeze(k).shape == theirs.unsqueeze(k).shape


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_spectra_equal_transformer_lens(TLFactoredMatrix, case, dtype):
    tol = TOLERANCE[dtype]
    A, B = pair(case, dtype, seed=2)
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    U, S, V = ours.svd()
    tU, tS, tV = theirs.svd()
    assert (U.shape, S.shape, V.shape) == (tU.shape, tS.shape, tV.shape)
    assert rel(S, tS) <= tol
    assert rel(ours.norm(), theirs.norm()) <= tol
    assert rel(U @ torch.diag_embed(S) @ V.mT, tU @ torch.diag_embed(tS) @ tV.mT) <= tol
    eye = torch.eye(S.shape[-1], dtype=torch.float64)
    vector_tol = 1e-8 if dtype == torch.float64 else 1e-5  # cosines: sensitive to singular gaps
    assert ((U.double().mT @ tU.double()).abs() - eye).abs().max() <= vector_tol
    assert ((V.double().mT @ tV.double()).abs() - eye).abs().max() <= vector_tol
    left, tl_left = ours.collapse_l(), theirs.collapse_l()  # S V^T: compare V S^2 V^T
    right, tl_right = ours.collapse_r(), theirs.collapse_r()  # U S: compare U S^2 U^T
    assert left.shape == tl_left.shape and right.shape == tl_right.shape
    assert rel(left.mT @ left, tl_left.mT @ tl_left) <= tol
    assert rel(right @ right.mT, tl_right @ tl_right.mT) <= tol
    even, tl_even = ours.make_even(), theirs.make_even()
    assert even.shape == tl_even.shape and even.mdim == tl_even.mdim
    assert rel(even.AB, tl_even.AB) <= tol
    assert rel(even.A.mT @ even.A, tl_even.A.mT @ tl_even.A) <= tol  # both diag(S)
    if ours.ldim == ours.rdim:
        mine, tl = ours.eigenvalues, theirs.eigenvalues  # same multiset, any order
        assert mine.shape == tl.shape
        distance = (mine[..., :, None] - tl[..., None, :]).abs()
        scale = tl.abs().max().item()
        assert distance.min(-1).values.max() <= tol * scale and distance.min(-2).values.max() <= tol * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composition_scores_equal_transformer_lens(transformer_lens, TLFactoredMatrix, dtype):
    from transformer_lens.utilities.matrix import composition_scores as tl_composition_scores

    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    left_A, left_B, right_A, right_B = rand(2, 3, 16, 4), rand(2, 3, 4, 16), rand(5, 16, 4), rand(5, 4, 16)
    ours = composition_scores(FactoredMatrix(left_A, left_B), FactoredMatrix(right_A, right_B))
    theirs = tl_composition_scores(TLFactoredMatrix(left_A, left_B), TLFactoredMatrix(right_A, right_B))
    assert ours.shape == theirs.shape == (2, 3, 5)
    assert rel(ours, theirs) <= TOLERANCE[dtype]
    right_A, right_B = rand(3, 16, 4), rand(3, 4, 16)
    ours = composition_scores(FactoredMatrix(left_A, left_B), FactoredMatrix(right_A, right_B), broadcast_dims=False)
    theirs = tl_composition_scores(
        TLFactoredMatrix(left_A, left_B), TLFactoredMatrix(right_A, right_B), broadcast_dims=False
    )
    assert ours.shape == theirs.shape == (2, 3)
    assert rel(ours, theirs) <= TOLERANCE[dtype]
