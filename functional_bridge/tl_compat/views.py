"""HookedTransformer's module paths as read-only views: ``bridge.blocks[3].attn.W_Q``,
``bridge.blocks[0].mlp.hook_post``, ``bridge.ln_final.w``, ``bridge.unembed.W_U``...

A TLView is a path, not a module: each attribute read derives that TL weight from the leaves at
that moment (``fb.tl_weights``), or returns the Bridge's hook point of that name, so nothing is
registered twice in the module tree and nothing can be stale. Writes go through
``bridge.set_tl_weights({"blocks.3.attn.W_Q": value})``.
"""

from __future__ import annotations

from torch import nn

from ..analysis.circuits import head_weight
from ..analysis.factored_matrix import FactoredMatrix
from ..editing import present_extras
from ..tl_layout import tl_layout
from ..weights import tl_weights


def tl_keys(bridge) -> dict[str, tuple[int, ...]]:
    """TL weight name -> shape for the bridge's current leaves (shapes only, cached by layout)."""
    return tl_layout(bridge._config, present_extras(bridge.params, bridge._config)).shapes


class TLView:
    """The HookedTransformer submodule at ``path`` (e.g. "blocks.3.attn")."""

    __slots__ = ("_bridge", "_path")

    def __init__(self, bridge, path: str):
        object.__setattr__(self, "_bridge", bridge)
        object.__setattr__(self, "_path", path)

    def _children(self) -> set[str]:
        prefix = self._path + "."
        names = [*tl_keys(self._bridge), *self._bridge.hook_dict, "unembed.b_U"]
        return {name[len(prefix) :].split(".")[0] for name in names if name.startswith(prefix)}

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        path = f"{self._path}.{name}"
        bridge = self._bridge
        keys = tl_keys(bridge)
        if path in keys:
            return tl_weights(bridge.params, bridge._config)[path]
        if path == "unembed.b_U":  # HookedTransformer's is zeros where the HF model has none
            return bridge.b_U
        if path in bridge.hook_dict:
            return bridge.hook_dict[path]
        if self._path.endswith(".attn") and name in ("QK", "OV"):
            return _head_circuit(bridge, int(self._path.split(".")[1]), name)
        if name in self._children():
            return TLView(bridge, path)
        raise AttributeError(f"{self._path} has no attribute {name!r}; it has: {', '.join(sorted(self._children()))}")

    def __setattr__(self, name, value):
        raise AttributeError(
            f"{self._path}.{name} is derived from the leaves on every read; write TL weights with "
            f"bridge.set_tl_weights({{'{self._path}.{name}': value}})"
        )

    def __dir__(self):
        return sorted(self._children() | ({"QK", "OV"} if self._path.endswith(".attn") else set()))

    def __repr__(self):
        return f"TLView({self._path!r}: {', '.join(sorted(self._children()))})"

    def __reduce__(self):
        return TLView, (self._bridge, self._path)


# The facade's view names at the root of a Bridge. A leaf registered under one of them (the
# extra leaf "unembed.b_U" that processing adds) lives in a TLContainer.
ROOT_VIEWS = frozenset({"blocks", "embed", "pos_embed", "unembed", "ln_final"})


class TLContainer(nn.Module):
    """The container module of extra leaves at a HookedTransformer path (``unembed`` holding
    ``b_U``): an nn.Module for torch (state_dict, functional_call, optimizers), answering TL's
    attributes (``W_U``, ``hook_out``...) like a TLView for everything it does not hold."""

    def __init__(self, bridge, path: str):
        super().__init__()
        object.__setattr__(self, "_tl_view", TLView(bridge, path))
        object.__setattr__(self, "_registering", False)

    def register_parameter(self, name, param) -> None:
        self.__dict__["_registering"] = True  # torch's hasattr check must not see the TL view
        try:
            super().register_parameter(name, param)
        finally:
            self.__dict__["_registering"] = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self.__dict__.get("_registering", True):
                raise
            return getattr(self.__dict__["_tl_view"], name)


def _head_circuit(bridge, layer: int, name: str) -> FactoredMatrix:
    """HookedTransformer's block.attn.QK / .OV: [n_heads, d_model, d_model], kept factored."""
    tl, cfg = tl_weights(bridge.params, bridge._config), bridge._config
    if name == "QK":
        return FactoredMatrix(head_weight(tl, cfg, layer, "W_Q"), head_weight(tl, cfg, layer, "W_K").transpose(-2, -1))
    return FactoredMatrix(head_weight(tl, cfg, layer, "W_V"), head_weight(tl, cfg, layer, "W_O"))


class BlockList:
    """``bridge.blocks``: a sequence of TLViews, one per block (len, index, negative index,
    slices, iteration), as HookedTransformer's ModuleList reads."""

    __slots__ = ("_bridge",)

    def __init__(self, bridge):
        self._bridge = bridge

    def __len__(self) -> int:
        return self._bridge._config.n_layers

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        layers = range(len(self))
        try:
            layer = layers[index]
        except IndexError:
            raise IndexError(f"block index {index} out of range for {len(self)} blocks") from None
        return TLView(self._bridge, f"blocks.{layer}")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self):
        return f"BlockList({len(self)} blocks)"
