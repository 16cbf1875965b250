"""Registered hooks: TransformerLens's stateful hook API, kept on the Bridge facade.

HookedTransformer keeps hooks on HookPoint modules inside the model. Here the Bridge keeps them
in a HookRegistry, by hook name, and turns them into a HookSet (hooks.py) that it passes to the
pure forward on every call; the pure forward itself holds nothing. The objects users touch
have TransformerLens's shape: ``bridge.hook_dict[name]`` is a FacadeHookPoint with ``add_hook``,
``remove_hooks``, ``fwd_hooks`` / ``bwd_hooks`` (LensHandle lists), ``ctx``, ``layer()``; hooks
get the hook point as their second argument and may return a replacement, as TransformerLens's
(which passes it by keyword, ``hook=``: a hook declaring it keyword-only is the one difference).

Backward hooks become autograd hooks on the activations of each forward call. A backward pass
run after its hook was removed (a ``hooks()`` context exited) does not call it, as in
TransformerLens, where removing the hook removes the module's backward hook.
"""

from __future__ import annotations

from typing import Callable, Literal

from ..config import BridgeConfig
from ..hooks import HookSet, select_names

Direction = Literal["fwd", "bwd"]


class LensHandle:
    """TransformerLens's LensHandle: one registered hook (``handle.hook.remove()`` removes it)."""

    __slots__ = ("point", "user_hook", "dir", "is_permanent", "context_level", "removed")

    def __init__(self, point: "FacadeHookPoint", user_hook: Callable, dir: Direction, is_permanent: bool, context_level):
        self.point, self.user_hook, self.dir = point, user_hook, dir
        self.is_permanent, self.context_level, self.removed = is_permanent, context_level, False

    @property
    def hook(self) -> "LensHandle":
        return self  # TL's handle.hook is the torch handle, whose remove() this provides

    def remove(self) -> None:
        if not self.removed:
            self.removed = True
            handles = self.point.fwd_hooks if self.dir == "fwd" else self.point.bwd_hooks
            handles[:] = [h for h in handles if h is not self]
            self.point._registry.changed(self.point.name)

    def __repr__(self):
        kind = "permanent " if self.is_permanent else ""
        return f"LensHandle({kind}{self.dir} hook {self.user_hook!r} on {self.point.name!r}, level={self.context_level})"


class FacadeHookPoint:
    """A hook point of a Bridge, with TransformerLens's HookPoint interface. Calling it is the
    identity (as a HookPoint module's forward); the Bridge's forward runs its hooks."""

    def __init__(self, name: str, registry: "HookRegistry"):
        self.name = name
        self._registry = registry
        self.fwd_hooks: list[LensHandle] = []
        self.bwd_hooks: list[LensHandle] = []
        self.ctx: dict = {}

    def add_hook(self, hook: Callable, dir: Direction = "fwd", is_permanent: bool = False, level=None, prepend: bool = False) -> LensHandle:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(hook):
            raise TypeError(f"hook for {self.name!r} is not callable: {hook!r}")
        handle = LensHandle(self, hook, dir, is_permanent, level)
        handles = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        handles.insert(0, handle) if prepend else handles.append(handle)
        self._registry.changed(self.name)
        return handle

    def add_perma_hook(self, hook: Callable, dir: Direction = "fwd") -> LensHandle:
        return self.add_hook(hook, dir=dir, is_permanent=True)

    def remove_hooks(self, dir: Literal["fwd", "bwd", "both"] = "fwd", including_permanent: bool = False, level=None) -> None:
        """As TransformerLens: permanent hooks stay unless including_permanent; with a level,
        only hooks added at that context level go."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        for handles in [self.fwd_hooks] * (dir != "bwd") + [self.bwd_hooks] * (dir != "fwd"):
            for handle in list(handles):
                if including_permanent or (not handle.is_permanent and (level is None or handle.context_level == level)):
                    handle.remove()

    def has_hooks(self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = True, level=None) -> bool:
        handles = (self.fwd_hooks if dir != "bwd" else []) + (self.bwd_hooks if dir != "fwd" else [])
        return any(
            (including_permanent or not h.is_permanent) and (level is None or h.context_level == level) for h in handles
        )

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int:
        parts = self.name.split(".")
        if parts[0] != "blocks":
            raise ValueError(f"hook {self.name!r} is not inside a block")
        return int(parts[1])

    def __call__(self, x):
        return x

    def __repr__(self):
        counts = [f"{len(hs)} {d}" for d, hs in (("fwd", self.fwd_hooks), ("bwd", self.bwd_hooks)) if hs]
        return f"HookPoint({', '.join([repr(self.name), *counts])})"


class HookRegistry:
    """A Bridge's hook points (created when first used) and the HookSet their hooks make."""

    def __init__(self, cfg: BridgeConfig):
        self.cfg = cfg
        self.points: dict[str, FacadeHookPoint] = {}
        self.context_level = 0
        self.is_caching = False
        self._active: set[str] = set()  # names with at least one hook
        self._hookset: HookSet | None = None
        self.extra_names: frozenset[str] = frozenset()  # valid beyond the model's (spliced SAEs' hooks)

    def point(self, name: str) -> FacadeHookPoint:
        """The hook point of a name (any hook name of the model, optional ones included)."""
        point = self.points.get(name)
        if point is None:
            if name not in self.extra_names:
                select_names(self.cfg, name)  # raises for unknown names, with the closest ones
            point = self.points[name] = FacadeHookPoint(name, self)
        return point

    def changed(self, name: str) -> None:
        point = self.points[name]
        if point.fwd_hooks or point.bwd_hooks:
            self._active.add(name)
        else:
            self._active.discard(name)
        self._hookset = None

    def handles(self):
        for name in list(self._active):
            point = self.points[name]
            yield from point.fwd_hooks
            yield from point.bwd_hooks

    def hookset(self) -> HookSet | None:
        """The registered hooks as one HookSet (cached until the registry changes); None if none."""
        if not self._active:
            return None
        if self._hookset is None:
            fwd, bwd = {}, {}
            for name in self._active:
                point = self.points[name]
                fwd[name] = [_forward_fn(h) for h in point.fwd_hooks]
                bwd[name] = [_backward_fn(h) for h in point.bwd_hooks]
            self._hookset = HookSet(fwd, bwd, self.points)
        return self._hookset


def _forward_fn(handle: LensHandle):
    return handle.user_hook  # called fn(activation, hook_point), as every hook of the pure layer


def _backward_fn(handle: LensHandle):
    fn = handle.user_hook

    def call(grad, point):
        return None if handle.removed else fn(grad, point)

    return call
