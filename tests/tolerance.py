"""Grounded tolerances: every bound a test asserts is derived from the computation it checks, never
an absolute number tuned on one machine, so the suite holds on any CPU, thread count and BLAS.

Three kinds of bound:

- ``assert_as_accurate_as(ours, oracle, ref64)``: the oracle's computation run again in float64 is
  the reference; ours may be no further from it than ``FACTOR`` times the oracle's own distance to
  it, with a floor of ``FLOOR_ULPS`` units of rounding at the values' magnitude (for an oracle that
  happens to round exactly). Whatever the machine rounds, it rounds for the oracle too.
- ``rounding_bound(scale, dtype, n)``: ``C_ROUND * eps(dtype) * scale * sqrt(n)``, for closed forms
  and reorderings of the same arithmetic: values at most ``scale`` in magnitude, ``n`` roundings
  accumulated along the longest chain (a sum of n terms, a network's depth), added as a random walk.
- ``assert_within_gap(measured, gap, floor)``: no further than ``FACTOR`` times the distance between
  two oracles that are both right (HF eager vs HF sdpa), with a floor.

Every check goes through ``check``, which records ``{test, what, measured, bound, margin}`` as one
JSON line appended to the file named by ``$FB_MARGINS`` when that is set (one ``write`` per line on
an ``O_APPEND`` descriptor: safe with several processes). ``python tests/margins.py FILE`` prints the
worst margin (measured / bound) per test file."""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping

import torch

FACTOR = 4.0  # ours may be this many times further from float64 than the oracle is
FLOOR_ULPS = 4.0  # units of rounding at the values' magnitude below which any oracle error counts as this
C_ROUND = 8.0  # rounding_bound's constant: the tail of a random walk of n roundings, with room


def eps(dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` at 1 (float32: 1.19e-7, float64: 2.2e-16, bfloat16: 7.8e-3)."""
    return torch.finfo(dtype).eps


def max_abs(x: torch.Tensor) -> float:
    """max |x| in float64 (0 for an empty tensor)."""
    return x.detach().double().abs().max().item() if x.numel() else 0.0


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, in float64 (shapes must match: no silent broadcasting)."""
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def forward_depth(cfg, n_tokens: int) -> int:
    """Roundings accumulated along a forward's longest chain: per layer the d_model-long and
    d_mlp-long dot products and the attention sum over up to n_tokens keys, then the unembedding."""
    return cfg.n_layers * (cfg.d_model + cfg.d_mlp + n_tokens) + cfg.d_model


def rounding_bound(scale: float, dtype: torch.dtype, n: int = 1, c: float = C_ROUND) -> float:
    """``c * eps(dtype) * scale * sqrt(n)``: what n accumulated roundings of values at most ``scale``
    in magnitude can add up to (a random walk's spread, times c for its tail and for room)."""
    return c * eps(dtype) * scale * math.sqrt(max(n, 1))


def singular_vector_bound(S: torch.Tensor, dtype: torch.dtype, n: int, k: int | None = None) -> float:
    """How far a computed unit singular vector can turn (first-order perturbation theory): the
    matrix's rounding, rounding_bound(S_max, dtype, n), over the smallest gap between one of the
    first k (default: all) singular values in S [..., r] (descending) and its neighbours, the
    last one's lower neighbour being 0 (the null space of a rank-r product)."""
    S = S.detach().double().reshape(-1, S.shape[-1])
    padded = torch.cat([S, torch.zeros_like(S[:, :1])], dim=-1)
    gaps = (padded[:, :-1] - padded[:, 1:]).abs()  # gaps[:, i]: between value i and i + 1
    return rounding_bound(S.abs().max().item(), dtype, n) / gaps[:, : k or S.shape[-1]].min().item()


def adamw_rounding_bound(grad_scale: float, steps: int, lr: float, adam_eps: float, dtype: torch.dtype, n: int) -> float:
    """How far two runs of one AdamW training can drift apart when their gradients differ by
    rounding only: an update lr * m / (sqrt(v) + eps) moves by up to lr / eps per unit change of a
    near-zero gradient, so steps * lr / eps * rounding_bound(grad_scale, dtype, n). In float32 that
    is ~lr itself (any order of summation drifts ~1e-5: HF's own eager and sdpa do), so AdamW runs
    are compared in float64, where it stays far below what a wrong gradient or step moves."""
    return steps * lr / adam_eps * rounding_bound(grad_scale, dtype, n)


def _node_id() -> str:
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return current.rsplit(" (", 1)[0] if current else "?"


def record(what: str, measured: float, bound: float) -> None:
    """Append one JSON line to $FB_MARGINS (when set): the test's node id, what was checked, the
    measured value, the bound and their ratio, the margin."""
    path = os.environ.get("FB_MARGINS")
    if not path:
        return
    measured, bound = float(measured), float(bound)
    margin = measured / bound if bound > 0 else (0.0 if measured == 0 else math.inf)
    line = json.dumps({"test": _node_id(), "what": what, "measured": measured, "bound": bound, "margin": margin})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def check(measured: float, bound: float, what: str = "") -> None:
    """assert measured <= bound, recorded (see record)."""
    record(what, measured, bound)
    assert measured <= bound, f"{what}: {measured:.3g} > bound {bound:.3g} (margin {measured / bound if bound else math.inf:.2f})"


def check_above(measured: float, bound: float, what: str = "") -> None:
    """assert measured > bound: an effect (a wrong setting, an edit) shows well above rounding.
    Recorded with margin bound / measured, so that for it too a margin below 1 passes."""
    record(what, bound, measured)
    assert measured > bound, f"{what}: {measured:.3g} is not above {bound:.3g}"


def assert_rounding_close(actual, expected, *, n: int = 1, scale: float | None = None, dtype=None, c: float = C_ROUND,
                          what: str = "") -> None:  # fmt: skip
    """max |actual - expected| <= rounding_bound(scale, dtype, n). scale defaults to max |expected|;
    dtype to the less precise of the two."""
    if dtype is None:
        dtype = _coarser(actual.dtype, expected.dtype)
    scale = max_abs(expected) if scale is None else scale
    check(max_diff(actual, expected), rounding_bound(scale, dtype, n, c), what)


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if eps(a) >= eps(b) else b


def _finite_parts(ours, oracle, ref):
    """Compare finite entries only, after asserting that -inf/inf (masked scores) sit alike."""
    finite = ref.isfinite()
    assert torch.equal(ours.isfinite(), finite) and torch.equal(oracle.isfinite(), finite), "different inf positions"
    return ours[finite], oracle[finite], ref[finite]


def as_accurate_as_bound(oracle, ref64, *, scale: float | None = None, dtype=None, factor: float = FACTOR) -> float:
    """factor * max(|oracle - ref64|, FLOOR_ULPS * eps(dtype) * scale); scale defaults to max |ref64|,
    dtype to the oracle's."""
    scale = max_abs(ref64) if scale is None else scale
    return factor * max(max_diff(oracle, ref64), FLOOR_ULPS * eps(dtype or oracle.dtype) * scale)


def assert_as_accurate_as(ours, oracle, ref64, *, factor: float = FACTOR, scale: float | None = None,
                          per_key_scale: bool = False, what: str = "") -> None:  # fmt: skip
    """|ours - ref64| <= factor * max(|oracle - ref64|, FLOOR_ULPS * eps * scale), where ref64 is the
    oracle's computation in float64 and scale defaults to max |ref64|. Tensors, or mappings of
    tensors: each key is checked, and the worst key's margin recorded. The floor's scale is then
    the largest over all keys (gradients: a key whose true value is ~0 holds rounding noise of the
    others, and is not held to zero), or each key's own with per_key_scale (activations, whose
    magnitudes differ by design)."""
    if isinstance(ours, Mapping):
        assert set(ours) == set(oracle) == set(ref64), "different keys"
        if scale is None and not per_key_scale:
            scale = max(max_abs(v) for v in ref64.values())
        checked = []  # (margin, measured, bound, key)
        for key in ours:
            a, o, r = _finite_parts(ours[key], oracle[key], ref64[key])
            measured = max_diff(a, r)
            bound = as_accurate_as_bound(o, r, scale=max_abs(r) if per_key_scale else scale, dtype=ours[key].dtype, factor=factor)
            checked.append((measured / bound if bound else (0.0 if measured == 0 else math.inf), measured, bound, key))
        margin, measured, bound, key = max(checked)
        check(measured, bound, f"{what} {key}".strip())
        return
    dtype = ours.dtype
    ours, oracle, ref64 = _finite_parts(ours, oracle, ref64)
    scale = max_abs(ref64) if scale is None else scale
    check(max_diff(ours, ref64), as_accurate_as_bound(oracle, ref64, scale=scale, dtype=dtype, factor=factor), what)


def assert_matches_oracle(ours, oracle, oracle64, *, n: int, what: str = "") -> None:
    """Ours against an oracle computed in ours' dtype: below float64, as accurate as the oracle
    against its own float64 run (oracle64, see assert_as_accurate_as); in float64, within float64
    rounding of the oracle at its values' magnitude over n accumulated roundings."""
    if ours.dtype == torch.float64:
        assert_rounding_close(ours, oracle, n=n, what=what)
    else:
        assert_as_accurate_as(ours, oracle, oracle64, what=what)


def assert_within_gap(measured: float, gap: float, *, floor: float, factor: float = FACTOR, what: str = "") -> None:
    """measured <= factor * max(gap, floor): within the distance of two right oracles."""
    check(measured, factor * max(gap, floor), what)


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model in float64 (a deep copy: the float32 original is left alone). Mixture-of-
    experts models run their experts eagerly there (HF's default grouped_mm has no float64)."""
    model = copy.deepcopy(model).double()
    if getattr(getattr(model, "config", None), "_experts_implementation", None) not in (None, "eager"):
        model.set_experts_implementation("eager")
    return model


def float64(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: the detached float64 value}: a params pytree for the float64 reference run."""
    return {name: value.detach().double() for name, value in params.items()}
