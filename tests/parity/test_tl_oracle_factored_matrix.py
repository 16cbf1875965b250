"""FactoredMatrix and composition_scores against TransformerLens 3.9's, on random inputs.

Where a result depends on the arbitrary signs of singular vectors (U, V, collapse_l,
collapse_r, make_even's factors) the comparison is on invariants: singular values, products,
Gram matrices, and |U_ours^T U_TL| = I (each vector equal up to sign; the random spectra have
well-separated singular values, so the vectors are determined up to sign).

Tolerances (tests/tolerance.py): in float32 ours is no further from TransformerLens's result on
the same inputs in float64 than 4x TransformerLens's float32 result is; in float64 both agree to
float64 rounding at the values' magnitude (singular vectors: to it divided by the smallest gap
between singular values, first-order perturbation theory)."""

import pytest
import torch

from functional_bridge.analysis import FactoredMatrix, composition_scores
from tolerance import FACTOR, FLOOR_ULPS, assert_matches_oracle, check, eps, rounding_bound, singular_vector_bound

pytestmark = pytest.mark.oracle

CASES = [  # (lead A, lead B, ldim, mdim, rdim)
    ((), (), 9, 4, 7),
    ((3,), (3,), 8, 5, 8),
    ((2, 1), (3,), 6, 3, 10),
    ((4,), (), 5, 8, 6),  # mdim larger than ldim and rdim
]


def pair(case, dtype, seed=0):
    lead_a, lead_b, l, m, r = case
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*lead_a, l, m, generator=gen, dtype=torch.float64).to(dtype)
    B = torch.randn(*lead_b, m, r, generator=gen, dtype=torch.float64).to(dtype)
    return A, B


@pytest.fixture
def TLFactoredMatrix(transformer_lens):
    from transformer_lens.FactoredMatrix import FactoredMatrix as TL

    return TL


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_products_shapes_and_indexing_equal_transformer_lens(TLFactoredMatrix, case, dtype):
    A, B = pair(case, dtype)
    ours, theirs, theirs64 = FactoredMatrix(A, B), TLFactoredMatrix(A, B), TLFactoredMatrix(A.double(), B.double())
    n = A.shape[-1] * max(A.shape[-2], B.shape[-1])  # the longest chain: products through mdim, then rdim or ldim

    def close(f, what):
        """f(FactoredMatrix class, matrix, cast) for ours, TL's and TL's in float64."""
        results = (f(FactoredMatrix, ours, dtype), f(TLFactoredMatrix, theirs, dtype))
        assert_matches_oracle(*results, f(TLFactoredMatrix, theirs64, torch.float64), n=n, what=what)

    assert ours.shape == theirs.shape and ours.ndim == theirs.ndim
    assert (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)
    assert [x.shape for x in ours.pair] == [x.shape for x in theirs.pair]
    assert torch.equal(ours.AB, theirs.AB) and torch.equal(ours.T.AB, theirs.T.AB)
    if ours.ldim == ours.rdim:
        assert torch.equal(ours.BA, theirs.BA)
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    right_vector, left_vector = rand(ours.rdim), rand(ours.ldim)
    close(lambda _, fm, t: fm @ right_vector.to(t), "@ vector")
    close(lambda _, fm, t: left_vector.to(t) @ fm, "vector @")
    for cols in (2, 11):
        right_matrix, left_matrix = rand(ours.rdim, cols), rand(cols, ours.ldim)
        for mine, tl in ((ours @ right_matrix, theirs @ right_matrix), (left_matrix @ ours, left_matrix @ theirs)):
            assert mine.mdim == tl.mdim and mine.shape == tl.shape
        close(lambda _, fm, t: (fm @ right_matrix.to(t)).AB, f"@ matrix {cols}")
        close(lambda _, fm, t: (left_matrix.to(t) @ fm).AB, f"matrix {cols} @")
    other_A, other_B = rand(ours.rdim, 3), rand(3, 4)
    chained, tl_chained = ours @ FactoredMatrix(other_A, other_B), theirs @ TLFactoredMatrix(other_A, other_B)
    assert chained.shape == tl_chained.shape and chained.mdim == tl_chained.mdim
    close(lambda cls, fm, t: (fm @ cls(other_A.to(t), other_B.to(t))).AB, "chained")
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
    A, B = pair(case, dtype, seed=2)
    ours, theirs, theirs64 = FactoredMatrix(A, B), TLFactoredMatrix(A, B), TLFactoredMatrix(A.double(), B.double())
    # LAPACK bounds an SVD's error by p(dims) eps ||A|| with p a modest polynomial: here sqrt(n), n
    # = (ldim + mdim + rdim)^2
    n = (A.shape[-2] + A.shape[-1] + B.shape[-1]) ** 2

    def close(f, what):
        assert_matches_oracle(f(ours), f(theirs), f(theirs64), n=n, what=what)

    U, S, V = ours.svd()
    tU, tS, tV = theirs.svd()
    assert (U.shape, S.shape, V.shape) == (tU.shape, tS.shape, tV.shape)
    close(lambda fm: fm.svd()[1], "S")
    close(lambda fm: fm.norm(), "norm")
    close(lambda fm: fm.svd()[0] @ torch.diag_embed(fm.svd()[1]) @ fm.svd()[2].mT, "U S V^T")
    # cosines of ours with TL's vectors: |U^T tU| = I up to both sides' vector errors
    eye = torch.eye(S.shape[-1], dtype=torch.float64)
    vector_bound = 2 * singular_vector_bound(theirs64.S, dtype, n)
    check(((U.double().mT @ tU.double()).abs() - eye).abs().max().item(), vector_bound, "U cosines")
    check(((V.double().mT @ tV.double()).abs() - eye).abs().max().item(), vector_bound, "V cosines")
    assert ours.collapse_l().shape == theirs.collapse_l().shape and ours.collapse_r().shape == theirs.collapse_r().shape
    close(lambda fm: fm.collapse_l().mT @ fm.collapse_l(), "collapse_l")  # S V^T: compare V S^2 V^T
    close(lambda fm: fm.collapse_r() @ fm.collapse_r().mT, "collapse_r")  # U S: compare U S^2 U^T
    even, tl_even = ours.make_even(), theirs.make_even()
    assert even.shape == tl_even.shape and even.mdim == tl_even.mdim
    close(lambda fm: fm.make_even().AB, "make_even")
    close(lambda fm: fm.make_even().A.mT @ fm.make_even().A, "make_even A^T A")  # both diag(S)
    if ours.ldim == ours.rdim:  # the same multiset, any order: each one's distance to the nearest
        nearest = lambda x, y: (x[..., :, None] - y[..., None, :]).abs().min(-1).values.max().item()  # noqa: E731
        mine, tl, tl64 = ours.eigenvalues, theirs.eigenvalues, theirs64.eigenvalues
        assert mine.shape == tl.shape
        if dtype == torch.float64:
            check(max(nearest(mine, tl), nearest(tl, mine)), rounding_bound(tl.abs().max().item(), dtype, n), "eigenvalues")
        else:
            floor = FLOOR_ULPS * eps(dtype) * tl64.abs().max().item()
            oracle_error = max(nearest(tl, tl64), nearest(tl64, tl), floor)
            check(max(nearest(mine, tl64), nearest(tl64, mine)), FACTOR * oracle_error, "eigenvalues")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_composition_scores_equal_transformer_lens(transformer_lens, TLFactoredMatrix, dtype):
    from transformer_lens.utilities.matrix import composition_scores as tl_composition_scores

    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    left_A, left_B, right_A, right_B = rand(2, 3, 16, 4), rand(2, 3, 4, 16), rand(5, 16, 4), rand(5, 4, 16)

    def scores(A, B, C, D, **options):
        """Ours, TransformerLens's, and TransformerLens's in float64 (the same inputs)."""
        ours = composition_scores(FactoredMatrix(A, B), FactoredMatrix(C, D), **options)
        theirs = tl_composition_scores(TLFactoredMatrix(A, B), TLFactoredMatrix(C, D), **options)
        A, B, C, D = (x.double() for x in (A, B, C, D))
        return ours, theirs, tl_composition_scores(TLFactoredMatrix(A, B), TLFactoredMatrix(C, D), **options)

    n = 16 * 16  # Frobenius norms of 16 x 16 products
    ours, theirs, theirs64 = scores(left_A, left_B, right_A, right_B)
    assert ours.shape == theirs.shape == (2, 3, 5)
    assert_matches_oracle(ours, theirs, theirs64, n=n, what="broadcast")
    right_A, right_B = rand(3, 16, 4), rand(3, 4, 16)
    ours, theirs, theirs64 = scores(left_A, left_B, right_A, right_B, broadcast_dims=False)
    assert ours.shape == theirs.shape == (2, 3)
    assert_matches_oracle(ours, theirs, theirs64, n=n, what="paired")
