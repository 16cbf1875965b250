"""The Bridge's stateful hook API, HookedTransformer 3.9's (HookedRootModule's): add_hook,
add_perma_hook, reset_hooks, the hooks() context manager, run_with_hooks, run_with_cache,
get_caching_hooks, add_caching_hooks, hook_dict, mod_dict, and the set_use_* flags.

Hooks are kept in a HookRegistry (registry.py) and passed to the pure forward on each call.
The flags only decide what predicates and ``names_filter=None`` select: an optional hook point
(``attn.hook_result``...) named explicitly always works, and costs nothing unless hooked.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Callable

from torch import Tensor

from ..analysis import ActivationCache
from ..analysis.slicing import take
from ..hooks import OPTIONAL_HOOKS, HookSet, resolve_hooks, select_names
from .config import HOOK_FLAGS
from .registry import FacadeHookPoint, HookRegistry



class TLHooksMixin:
    # the registry and what it holds ------------------------------------------------------------

    @property
    def _registry(self) -> HookRegistry:
        registry = self.__dict__.get("_hook_registry")
        if registry is None:
            registry = self.__dict__["_hook_registry"] = HookRegistry(self._config)
        return registry

    def _optional_flags(self) -> tuple[str, ...]:
        return tuple(flag for flag in HOOK_FLAGS if getattr(self._tl, flag))

    def _select_names(self, name_or_filter, optional=None) -> list[str]:
        """The hook names a name, a list of names, a predicate or None selects, with the optional
        hook points of ``optional`` (default: the set_use_* flags). The SAE facade overrides it
        while SAEs are spliced in (their hook names replace the hook they sit on)."""
        return select_names(self._config, name_or_filter, self._optional_flags() if optional is None else optional)

    def _call_hooks(self, hooks=None) -> HookSet:
        """The HookSet for one forward: the registered hooks, then those passed to this call."""
        registered = self.__dict__.get("_hook_registry")
        registered = None if registered is None else registered.hookset()
        extra = resolve_hooks(self._config, hooks, (), self._optional_flags())
        return extra if registered is None else registered.combined(extra)

    @property
    def hook_dict(self) -> dict[str, FacadeHookPoint]:
        """Hook name -> hook point, every hook point of the model (optional ones included), in
        execution order."""
        registry = self._registry
        return {name: registry.point(name) for name in self._select_names(None, tuple(OPTIONAL_HOOKS))}

    def hook_points(self):
        return self.hook_dict.values()

    @property
    def mod_dict(self) -> dict:
        """HookedTransformer's module name -> module: the hook points and the TL submodule views."""
        from .views import TLView, tl_keys

        names = [*tl_keys(self), *self.hook_dict]
        prefixes = {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 1)}
        views = {path: self.blocks if path == "blocks" else TLView(self, path) for path in sorted(prefixes)}
        return {**views, **self.hook_dict}

    @property
    def context_level(self) -> int:
        return self._registry.context_level

    @property
    def is_caching(self) -> bool:
        return self._registry.is_caching

    def _hook_points_for(self, name: str | Callable[[str], bool]) -> list[FacadeHookPoint]:
        if not isinstance(name, str) and not callable(name):
            raise TypeError(f"a hook is attached to a hook name or a predicate on names, got {name!r}")
        return [self._registry.point(n) for n in self._select_names(name)]

    # adding and removing -----------------------------------------------------------------------

    def add_hook(self, name, hook, dir: str = "fwd", is_permanent: bool = False, level=None, prepend: bool = False) -> None:
        """Attach hook at a hook name (any, optional ones included) or at every name a predicate
        selects; it stays until removed (reset_hooks), permanent ones until including_permanent."""
        for point in self._hook_points_for(name):
            point.add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name, hook, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False, level=None) -> None:
        for point in list(self._registry.points.values()):
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for point in self._registry.points.values():
            point.clear_context()

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False, level=None) -> None:
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self._registry.is_caching = False

    def list_hooks(self, name_filter=None, dir: str = "both", including_permanent: bool = True) -> dict:
        """Hook name -> its LensHandles, for the names with hooks (TL's HookIntrospectionMixin)."""
        names = set(self._select_names(name_filter, tuple(OPTIONAL_HOOKS))) if name_filter is not None else None
        out = {}
        for name, point in self._registry.points.items():
            handles = (point.fwd_hooks if dir != "bwd" else []) + (point.bwd_hooks if dir != "fwd" else [])
            handles = [h for h in handles if including_permanent or not h.is_permanent]
            if handles and (names is None or name in names):
                out[name] = handles
        return out

    @contextmanager
    def hooks(self, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Hooks attached for the duration of a with block (nested blocks stack; everything this
        block added is removed on exit, also after an exception, unless reset_hooks_end=False)."""
        registry = self._registry
        try:
            registry.context_level += 1
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, hook in pairs:
                    for point in self._hook_points_for(name):
                        point.add_hook(hook, dir=direction, level=registry.context_level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=registry.context_level)
            registry.context_level -= 1

    def run_with_hooks(self, *model_args, fwd_hooks=(), bwd_hooks=(), reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):  # fmt: skip
        """forward(*model_args, **model_kwargs) with these hooks attached for the call."""
        if bwd_hooks and reset_hooks_end:
            logging.warning(
                "WARNING: Hooks will be reset at the end of run_with_hooks. This removes the backward hooks before a backward pass can occur."
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts) as model:
            return model.forward(*model_args, **model_kwargs)

    # caching -----------------------------------------------------------------------------------

    def get_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False,
                          cache: dict | None = None, pos_slice=None, detach: bool = True):  # fmt: skip
        """(cache, fwd_hooks, bwd_hooks): hooks that store each selected activation (and, with
        incl_bwd, its gradient as name + "_grad") in cache, as TransformerLens's. names_filter: a
        name, a list of names, a predicate or None (all). The position slice is taken on each
        activation's position axis (TransformerLens slices the head axis of hook_rot_q/k and
        the per-head inputs; this does not)."""
        cache = {} if cache is None else cache
        names = self._select_names(names_filter)
        if isinstance(pos_slice, int):  # as TransformerLens's Slice.unwrap: keep the position axis
            pos_slice = [pos_slice]
        self._registry.is_caching = True

        def save(tensor: Tensor, hook, is_backward: bool = False):
            x = tensor.detach() if detach else tensor
            if device is not None:
                x = x.to(device)
            if remove_batch_dim:
                x = x[0]
            if pos_slice is not None:
                x = _slice_positions(x, hook.name, pos_slice, batched=not remove_batch_dim)
            cache[hook.name + ("_grad" if is_backward else "")] = x

        fwd = [(name, partial(save, is_backward=False)) for name in names]
        bwd = [(name, partial(save, is_backward=True)) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None) -> dict:  # fmt: skip
        """Attach caching hooks (until reset_hooks) and return the dict they fill."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for direction, pairs in (("fwd", fwd), ("bwd", bwd)):
            for name, hook in pairs:
                self._registry.point(name).add_hook(hook, dir=direction)
        return cache

    def run_with_cache(self, *model_args, names_filter=None, device=None, remove_batch_dim: bool = False,
                       incl_bwd: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       pos_slice=None, return_cache_object: bool = True, detach: bool = True, fwd_hooks=(),
                       **model_kwargs):  # fmt: skip
        """(output, cache) as HookedTransformer's run_with_cache: the forward's output (per its
        return_type...) and an ActivationCache (a dict with return_cache_object=False) of the
        activations names_filter selects, after any hooks registered or passed as fwd_hooks.
        incl_bwd: also backpropagate the (scalar) output and cache gradients as name + "_grad".
        detach=False keeps the cached activations differentiable (TransformerLens detaches)."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, None, pos_slice, detach)
        with self.hooks([*fwd_hooks, *fwd], bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        if not return_cache_object:
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    # HookedTransformer's flags for optional hook points ----------------------------------------

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Let predicates and names_filter=None select attn.hook_result ([batch, pos, head, d_model])."""
        self._tl.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """... select hook_q_input / hook_k_input / hook_v_input ([batch, pos, head, d_model])."""
        self._tl.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """... select hook_mlp_in ([batch, pos, d_model])."""
        self._tl.use_hook_mlp_in = bool(use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """... select hook_attn_in ([batch, pos, head, d_model]); refused with grouped-query
        attention, as HookedTransformer refuses it."""
        if use_attn_in and self._config.n_kv_heads != self._config.n_heads:
            raise ValueError("Can't use attn_in with grouped-query attention, please use split_qkv_input instead")
        self._tl.use_attn_in = bool(use_attn_in)

    def set_ungroup_grouped_query_attention(self, ungroup: bool) -> None:
        if ungroup:
            raise NotImplementedError(
                "ungroup_grouped_query_attention is not provided: hook_k/hook_v keep n_key_value_heads heads; "
                "bridge.W_K / W_V (and cache analyses) give every query head its key/value head's weights"
            )


def _slice_positions(x: Tensor, name: str, pos_slice, batched: bool) -> Tensor:
    """pos_slice on an activation's position axis: the query axis of attention scores and
    patterns ([batch, head, query, key]), the axis after batch otherwise; per-head norm
    activations (Qwen3's q_norm/k_norm, [batch * pos * head, ...]) are left whole."""
    if ".q_norm." in name or ".k_norm." in name:
        return x
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("hook_attn_scores", "hook_pattern"):
        return take(x, pos_slice, -2) if x.dim() >= 2 else x
    dim = 1 if batched else 0
    return take(x, pos_slice, dim) if x.dim() > dim else x
