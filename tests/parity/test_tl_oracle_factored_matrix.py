"""FactoredMatrix and composition_scores against TransformerLens 3.9's, on random inputs.

FactoredMatrix runs TL's operations in TL's order (products, indexing, the SVD from the SVDs
of the factors), so every result is bitwise equal to TL's on the same inputs, singular vectors'
signs included. composition_scores is computed differently (a QR core, never the d_model
products): in float32 it is no further from TransformerLens's result on the same inputs in
float64 than 4x TransformerLens's float32 result is, in float64 both agree to float64 rounding
at the values' magnitude (tests/tolerance.py)."""

import warnings

import pytest
import torch

from functional_bridge.analysis import FactoredMatrix, composition_scores
from test_factored_matrix import Wrapped
from tolerance import assert_matches_oracle

pytestmark = pytest.mark.oracle

CASES = [  # (lead A, lead B, ldim, mdim, rdim)
    ((), (), 9, 4, 7),
    ((3,), (3,), 8, 5, 8),
    ((2, 1), (3,), 6, 3, 10),
    ((4,), (), 5, 8, 6),  # mdim larger than ldim and rdim
    ((1,), (), 6, 6, 6),  # a leading 1
]
DTYPES = [torch.float64, torch.float32]


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


def same(ours, theirs) -> bool:
    """Bitwise equal FactoredMatrices (or tensors, or tensor-likes)."""
    if isinstance(theirs, Wrapped):
        return isinstance(ours, Wrapped) and torch.equal(ours.tensor, theirs.tensor)
    if isinstance(theirs, torch.Tensor):
        return torch.equal(ours, theirs)
    return ours.shape == theirs.shape and ours.mdim == theirs.mdim and same(ours.A, theirs.A) and same(ours.B, theirs.B)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_shapes_and_products_equal_transformer_lens(TLFactoredMatrix, case, dtype):
    A, B = pair(case, dtype)
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    assert ours.shape == theirs.shape and ours.ndim == theirs.ndim and repr(ours) == repr(theirs)
    for attribute in ("ldim", "mdim", "rdim", "has_leading_dims"):
        assert getattr(ours, attribute) == getattr(theirs, attribute), attribute
    assert all(same(x, y) for x, y in zip(ours.pair, theirs.pair))
    assert same(ours.AB, theirs.AB) and same(ours.T, theirs.T)
    if ours.ldim == ours.rdim:
        assert same(ours.BA, theirs.BA)
    gen = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    right_vector, left_vector = rand(ours.rdim), rand(ours.ldim)
    assert same(ours @ right_vector, theirs @ right_vector) and same(left_vector @ ours, left_vector @ theirs)
    for n in (2, 11):  # fewer and more columns than mdim: the product keeps the smaller inner dim
        right_matrix, left_matrix = rand(ours.rdim, n), rand(1, n, ours.ldim)  # (a leading dim that broadcasts)
        assert same(ours @ right_matrix, theirs @ right_matrix) and same(left_matrix @ ours, left_matrix @ theirs)
        assert same(ours @ Wrapped(right_matrix), theirs @ Wrapped(right_matrix))  # tensor-likes: same dispatch
        assert same(Wrapped(left_matrix) @ ours, Wrapped(left_matrix) @ theirs)
    assert same(ours @ Wrapped(right_vector), theirs @ Wrapped(right_vector))
    other_A, other_B = rand(ours.rdim, 3), rand(3, 4)
    assert same(ours @ FactoredMatrix(other_A, other_B), theirs @ TLFactoredMatrix(other_A, other_B))
    half = torch.tensor(0.5, dtype=dtype)
    assert same(ours * 3.0, theirs * 3.0) and same(2 * ours, 2 * theirs) and same(ours * half, theirs * half)
    assert same(half[None] * ours, half[None] * theirs)  # a one-element tensor is a scalar too
    assert same(ours.get_corner(), theirs.get_corner()) and same(ours.get_corner(2), theirs.get_corner(2))
    for k in range(ours.ndim - 1):
        assert same(ours.unsqueeze(k), theirs.unsqueeze(k))


@pytest.mark.parametrize("case", CASES)
def test_indexing_equals_transformer_lens(TLFactoredMatrix, case):
    """TL 3.9's index forms (ints, slices, sequences, None; an int at a matrix dim keeps it).
    With ``...`` TL 3.9 mis-assigns the entries (test_factored_matrix.py checks ours against the
    dense product)."""
    A, B = pair(case, torch.float64)
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    n_lead = ours.ndim - 2
    lead = (0,) * n_lead
    indices = [(*lead, 2), (*lead, -1), (*lead, -1, slice(1, 3)), (*lead, slice(0, 2), -1), (*lead, -1, -1)]
    indices += [(*lead, [0, 2], [1])]
    indices += [(*(slice(None),) * n_lead, torch.tensor([3, 1]), 2)]
    if n_lead:
        indices += [(0,), (slice(1, None),), (None,), (-1,), ([0, 0],), (None, 0)]
    for index in indices:
        assert same(ours[index], theirs[index]), index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_spectra_equal_transformer_lens(TLFactoredMatrix, case, dtype):
    """The SVD, its factors' forms, the norm and the eigenvalues: bitwise TL's (the same
    decompositions in the same order), so the singular vectors have TL's signs too."""
    A, B = pair(case, dtype, seed=2)
    ours, theirs = FactoredMatrix(A, B), TLFactoredMatrix(A, B)
    assert all(same(x, y) for x, y in zip(ours.svd(), theirs.svd()))
    assert same(ours.U, theirs.U) and same(ours.S, theirs.S) and same(ours.V, theirs.V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert same(ours.Vh, theirs.Vh)
    assert same(ours.norm(), theirs.norm())
    assert same(ours.collapse_l(), theirs.collapse_l()) and same(ours.collapse_r(), theirs.collapse_r())
    assert same(ours.make_even(), theirs.make_even())
    if ours.ldim == ours.rdim:
        assert same(ours.eigenvalues, theirs.eigenvalues)


@pytest.mark.parametrize("dtype", DTYPES)
def test_composition_scores_equal_transformer_lens(transformer_lens, TLFactoredMatrix, dtype):
    """Both are ratios of Frobenius norms of d_model-sized products (TL forms them; ours goes
    through a QR core)."""
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
