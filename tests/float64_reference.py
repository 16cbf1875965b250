"""A float64 run of an HF model, the reference the property tests measure every float32 result
against (ours and HF's own), and the bound that compares their distances to it.

``hf_model.double()`` alone is not a float64 reference: HF's modeling code asks for float32
explicitly in places (RMSNorms compute in ``.to(torch.float32)``, eager softmax takes
``dtype=torch.float32``, rotary angles use ``.float()``, inverse frequencies and GPT-J's sin/cos
table are built at init in float32), so a ``.double()`` model rounds to float32 there. Inside
``float64_everywhere()`` every request for float32 yields float64 and the default dtype is
float64, so HF's own code runs in float64 end to end; the reference model is built there (its
rotary buffers computed in float64) and given the float32 model's parameters.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


class _Float32AsFloat64(TorchFunctionMode):
    """``dtype=torch.float32``, ``.to(torch.float32)``, ``.type(torch.float32)`` and ``.float()``
    give float64. (The mode is off while its handler runs, so the calls below are plain.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.float:
            return args[0].double()
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        args = tuple(torch.float64 if arg is torch.float32 else arg for arg in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_everywhere():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with _Float32AsFloat64():
            yield
    finally:
        torch.set_default_dtype(previous)


def float64_reference(model: torch.nn.Module, config) -> torch.nn.Module:
    """The HF class of ``model`` built from ``config`` in float64 (buffers computed in float64),
    holding ``model``'s parameters; eval mode, eager attention. Run it inside
    ``float64_everywhere()``. GPT-2's reorder_and_upcast_attn (numerics only: it checks that its
    scores are float32) is turned off."""
    if getattr(config, "reorder_and_upcast_attn", False):
        config.reorder_and_upcast_attn = False
    with float64_everywhere():
        reference = type(model)(config).eval()
    reference.set_attn_implementation("eager")
    if getattr(reference.config, "_experts_implementation", None) not in (None, "eager"):
        reference.set_experts_implementation("eager")  # HF's default grouped_mm has no float64
    theirs = dict(model.named_parameters())
    ours = dict(reference.named_parameters())
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theirs[name])
    floating = [t.dtype for t in (*reference.parameters(), *reference.buffers()) if t.is_floating_point()]
    assert set(floating) == {torch.float64}, set(floating)
    return reference


def distance(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_as_close_as_hf(
    ours: dict[str, Tensor], hf: dict[str, Tensor], reference: Tensor, what: str, *,
    factor: float, floor_ulps: float, eps: float = EPS32,
) -> None:  # fmt: skip
    """Each of ``ours`` is within ``factor`` times the furthest of ``hf`` (HF's own float32 runs)
    from the float64 ``reference``, plus ``floor_ulps`` units of ``eps`` times the reference's
    largest magnitude (for when HF happens to be nearly exact). ``eps`` EPS64 with ``hf`` still
    float32 runs bounds a float64 run of ours: rounding errors scale with the unit roundoff."""
    hf_distance = max(distance(value, reference) for value in hf.values())
    magnitude = reference.abs().max().item() if reference.numel() else 0.0
    bound = (eps / EPS32) * factor * hf_distance + floor_ulps * eps * magnitude
    distances = {name: distance(value, reference) for name, value in ours.items()}
    report = {name: f"{d:.3g}" for name, d in {**distances, **{k: distance(v, reference) for k, v in hf.items()}}.items()}
    for name, d in distances.items():
        assert d <= bound, f"{what}: {name} is {d:.3g} from float64, bound {bound:.3g} (|ref| <= {magnitude:.3g}); {report}"
