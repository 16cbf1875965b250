"""TL weights that no leaf stores refuse in-place writes, instead of silently dropping them.

Most TransformerLens weights are views of the HF leaves, so ``tl["blocks.0.attn.W_O"][0] = 0``
under ``torch.no_grad()`` edits the model. Some are not: a zero bias the HF layout lacks
(Llama's ``b_Q``), a grouped-query ``W_K`` expanded to every query head, a stacked
``bridge.W_Q``. A write to those would change a temporary copy and nothing else, so they are
returned as ``DerivedTensor``: a plain tensor in every computation (results are ordinary
tensors, autograd flows through), whose in-place writes, and writes into its views, raise an
error naming the TL key and pointing to ``set_tl_weights``, the documented way to edit.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor

# Methods whose name ends in "_" but which do not write the tensor's values.
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "detach_"})
_IN_PLACE_OPERATORS = frozenset(
    f"__i{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift")
)  # fmt: skip


def _writes(name: str) -> bool:
    """Whether the torch function of this name writes its first argument's values."""
    if name == "__setitem__" or name in _IN_PLACE_OPERATORS:  # x[i] = v, x += v
        return True
    return name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES


class DerivedTensor(Tensor):
    """A TL weight computed from the leaves (a copy) or constant: read-only in place."""

    tl_name: str = "this TL weight"
    reason: str = "it is computed from the leaves, not stored in one"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        compiling = torch.compiler.is_compiling()
        if not compiling:
            _refuse_writes(func, args, kwargs)
        result = super().__torch_function__(func, types, args, kwargs)  # DerivedTensor results
        if compiling:
            return _settle(result, None)
        sources = [a for a in args if isinstance(a, DerivedTensor)]
        return _settle(result, sources[0] if sources else None)


def _refuse_writes(func, args, kwargs) -> None:
    name = getattr(func, "__name__", "")
    written = args[0] if args and _writes(name) else kwargs.get("out")
    for target in written if isinstance(written, (tuple, list)) else (written,):
        if isinstance(target, DerivedTensor):
            raise RuntimeError(
                f"in-place write to {target.tl_name} refused: {target.reason}, so the write could "
                "not reach the model. Use bridge.set_tl_weights({name: value}) (or "
                "fb.set_tl_weights), which writes the HF leaves or says why it cannot."
            )


def _settle(result, source: "DerivedTensor | None"):
    """Results are plain tensors, except views of ``source`` (writes into them must fail too)."""
    if isinstance(result, (tuple, list)):
        return type(result)(_settle(r, source) for r in result)
    if not isinstance(result, DerivedTensor):
        return result
    if source is not None and result.numel() and _same_storage(result, source):
        result.tl_name, result.reason = source.tl_name, source.reason
        return result
    return result.as_subclass(Tensor)


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def mark_derived(tensor: Tensor, tl_name: str, reason: str) -> DerivedTensor:
    """tensor as a DerivedTensor (same data, same autograd history)."""
    with torch._C.DisableTorchFunctionSubclass():
        derived = tensor.as_subclass(DerivedTensor)
    derived.tl_name, derived.reason = tl_name, reason
    return derived


def guard_unstored(
    tl: dict[str, Tensor], params: Mapping[str, Tensor], reason_for: Callable[[str], str]
) -> dict[str, Tensor]:
    """Mark the entries of a TL dict that share no storage with any leaf as DerivedTensor, with
    ``reason_for(key)`` saying why each is not stored. Skipped while torch.compile traces or
    inside functorch transforms (nothing there can write to them)."""
    if not _guardable(tl):
        return tl
    stored = {leaf.untyped_storage().data_ptr() for leaf in params.values() if leaf.numel()}
    out = {}
    for key, value in tl.items():
        if value.numel() and value.untyped_storage().data_ptr() not in stored:
            value = mark_derived(value, key, reason_for(key))
        out[key] = value
    return out


def _guardable(tl: Mapping[str, Tensor]) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not any(
        value.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(value) for value in tl.values()
    )
