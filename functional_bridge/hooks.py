"""Hook points: HookedTransformer's names for a config, and hooks resolved for one forward call.

A hook is TransformerLens's: ``fn(activation, hook) -> activation or None`` where ``hook.name``
is the hook point's name; a returned tensor replaces the activation downstream. Hooks live only
for the call they are passed to (nothing is registered on an object), which is what lets a
hooked forward run inside vmap, grad and torch.compile. A backward hook ``fn(grad, hook) -> grad
or None`` becomes an autograd hook on that call's activation (a returned tensor replaces the
gradient flowing back), so it too belongs to that call only.

Optional hook points: HookedTransformer computes ``hook_attn_in``, ``hook_q_input`` /
``hook_k_input`` / ``hook_v_input``, ``attn.hook_result`` and ``hook_mlp_in`` only behind config
flags. Here they exist whenever a hook (or a cache filter naming them) asks for them, and cost
nothing otherwise; predicates and ``names_filter=None`` see them when the caller passes the
flags (``optional=``), as TransformerLens's ``set_use_attn_result`` etc. do.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable, Collection, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

from .config import BridgeConfig

HookFn = Callable[[Tensor, "HookPoint"], Union[Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]

# HookedTransformer's config flags -> the per-block hook points each one switches on.
OPTIONAL_HOOKS = {
    "use_attn_in": ("hook_attn_in",),
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_attn_result": ("attn.hook_result",),
    "use_hook_mlp_in": ("hook_mlp_in",),
    # not a HookedTransformer flag: HookedSAETransformer's extra hook point at the MLP's input (the
    # ln2 output, after its weights), which transcoders read; on in the Bridge's SAE methods
    "use_mlp_hook_in": ("mlp.hook_in",),
}
# TransformerLens hook points not provided, with what to use instead.
_NOT_PROVIDED = {"hook_tokens": "tokens are the forward's input"}
_ATTN_IN_GQA = (
    "hook_attn_in feeds one copy of the residual to every head, which grouped-query attention "
    "(n_key_value_heads < n_heads) cannot take (TransformerLens refuses it too): use "
    "hook_q_input / hook_k_input / hook_v_input"
)


class HookPoint:
    """What a hook function receives as its second argument."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def layer(self) -> int:
        """The block index of a ``blocks.{i}...`` hook."""
        parts = self.name.split(".")
        if parts[0] != "blocks":
            raise ValueError(f"hook {self.name!r} is not inside a block")
        return int(parts[1])

    def __repr__(self):
        return f"HookPoint({self.name!r})"


@dataclass(frozen=True)
class LayerHookNames:
    """The hook point names of block ``i``, in execution order (fields that do not apply to a
    config are None; ``experts`` lists a mixture-of-experts layer's per-expert names)."""

    resid_pre: str
    attn_in: str | None  # optional hook points (OPTIONAL_HOOKS) hold their names but are left
    q_input: str | None  # out of in_order() unless their flag is asked for
    k_input: str | None
    v_input: str | None
    ln1_scale: str | None
    ln1_normalized: str | None
    q: str
    k: str
    v: str
    q_norm_scale: str | None
    q_norm_normalized: str | None
    k_norm_scale: str | None
    k_norm_normalized: str | None
    rot_q: str | None
    rot_k: str | None
    attn_scores: str
    pattern: str
    z: str
    result: str
    ln1_post_scale: str | None  # a norm on the attention output (Gemma 2's ln1_post, OLMo 2's ln1)
    ln1_post_normalized: str | None
    attn_out: str
    ln1_resid_scale: str | None  # a norm on resid_pre + attn_out (OPT's post-LN)
    ln1_resid_normalized: str | None
    resid_mid: str | None
    mlp_in: str
    ln2_scale: str | None
    ln2_normalized: str | None
    mlp_hook_in: str
    expert_weights: str | None  # mixture of experts: router probabilities, chosen experts
    expert_indices: str | None
    experts: tuple[str, ...]  # per expert: hook_gate, hook_pre, hook_post
    mlp_pre: str | None
    mlp_pre_linear: str | None
    mlp_post: str | None
    ln2_post_scale: str | None  # a norm on the MLP output
    ln2_post_normalized: str | None
    mlp_out: str
    ln2_resid_scale: str | None  # a norm on resid_mid + mlp_out (OPT's post-LN)
    ln2_resid_normalized: str | None
    resid_post: str

    def in_order(self, optional: Collection[str] = ()) -> list[str]:
        """Names in execution order (the order HookedTransformer fills its cache), with the
        optional hook points of the given flags (OPTIONAL_HOOKS keys)."""
        wanted = {suffix for flag in optional for suffix in OPTIONAL_HOOKS[flag]}
        names = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                names.extend(value)
            elif value and (f.name not in _OPTIONAL_FIELDS or value.split(".", 2)[2] in wanted):
                names.append(value)
        return names

    def optional(self) -> list[str]:
        """Every optional hook point this block can provide."""
        return [getattr(self, name) for name in _OPTIONAL_FIELDS if getattr(self, name)]


_OPTIONAL_FIELDS = ("attn_in", "q_input", "k_input", "v_input", "result", "mlp_in", "mlp_hook_in")


def _memoized(fn):
    """lru_cache, bypassed while torch.compile traces (dynamo warns on lru_cache wrappers; the
    names are constants it folds anyway)."""
    cached = lru_cache(maxsize=None)(fn)

    def lookup(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    lookup.__doc__, lookup.__name__ = fn.__doc__, fn.__name__
    return lookup


def _norm_names(prefix: str | None) -> tuple[str | None, str | None]:
    return (prefix + "hook_scale", prefix + "hook_normalized") if prefix else (None, None)


@_memoized
def layer_hook_names(cfg: BridgeConfig, layer: int) -> LayerHookNames:
    p = f"blocks.{layer}."
    rotary = cfg.positional_embedding_type == "rotary"
    qk = cfg.use_qk_norm
    grouped = cfg.n_kv_heads != cfg.n_heads
    placement = cfg.norm_placement
    moe = cfg.num_experts is not None
    ln1 = p + "ln1." if placement in ("pre", "pre_post") else None
    ln2 = p + "ln2." if placement in ("pre", "pre_post") else None
    ln1_post = {"pre_post": p + "ln1_post.", "output": p + "ln1."}.get(placement)
    ln2_post = {"pre_post": p + "ln2_post.", "output": p + "ln2."}.get(placement)
    ln1_resid = p + "ln1." if placement == "post_residual" else None
    ln2_resid = p + "ln2." if placement == "post_residual" else None
    experts = ()
    if moe:
        experts = tuple(f"{p}mlp.experts.{e}.hook_{n}" for e in range(cfg.num_experts) for n in ("gate", "pre", "post"))
    return LayerHookNames(
        resid_pre=p + "hook_resid_pre",
        attn_in=None if grouped else p + "hook_attn_in",
        q_input=p + "hook_q_input",
        k_input=p + "hook_k_input",
        v_input=p + "hook_v_input",
        ln1_scale=_norm_names(ln1)[0],
        ln1_normalized=_norm_names(ln1)[1],
        q=p + "attn.hook_q",
        k=p + "attn.hook_k",
        v=p + "attn.hook_v",
        q_norm_scale=p + "attn.q_norm.hook_scale" if qk else None,
        q_norm_normalized=p + "attn.q_norm.hook_normalized" if qk else None,
        k_norm_scale=p + "attn.k_norm.hook_scale" if qk else None,
        k_norm_normalized=p + "attn.k_norm.hook_normalized" if qk else None,
        rot_q=p + "attn.hook_rot_q" if rotary else None,
        rot_k=p + "attn.hook_rot_k" if rotary else None,
        attn_scores=p + "attn.hook_attn_scores",
        pattern=p + "attn.hook_pattern",
        z=p + "attn.hook_z",
        result=p + "attn.hook_result",
        ln1_post_scale=_norm_names(ln1_post)[0],
        ln1_post_normalized=_norm_names(ln1_post)[1],
        attn_out=p + "hook_attn_out",
        ln1_resid_scale=_norm_names(ln1_resid)[0],
        ln1_resid_normalized=_norm_names(ln1_resid)[1],
        resid_mid=None if cfg.parallel_attn_mlp else p + "hook_resid_mid",
        mlp_in=p + "hook_mlp_in",
        ln2_scale=_norm_names(ln2)[0],
        ln2_normalized=_norm_names(ln2)[1],
        mlp_hook_in=p + "mlp.hook_in",
        expert_weights=p + "mlp.hook_expert_weights" if moe else None,
        expert_indices=p + "mlp.hook_expert_indices" if moe else None,
        experts=experts,
        mlp_pre=None if moe else p + "mlp.hook_pre",
        mlp_pre_linear=p + "mlp.hook_pre_linear" if cfg.gated_mlp and not moe else None,
        mlp_post=None if moe else p + "mlp.hook_post",
        ln2_post_scale=_norm_names(ln2_post)[0],
        ln2_post_normalized=_norm_names(ln2_post)[1],
        mlp_out=p + "hook_mlp_out",
        ln2_resid_scale=_norm_names(ln2_resid)[0],
        ln2_resid_normalized=_norm_names(ln2_resid)[1],
        resid_post=p + "hook_resid_post",
    )


def _optional_flags(optional: Collection[str]) -> frozenset[str]:
    flags = frozenset(optional)
    unknown = flags - set(OPTIONAL_HOOKS)
    if unknown:
        raise ValueError(f"unknown optional hook flags {sorted(unknown)}; known: {sorted(OPTIONAL_HOOKS)}")
    return flags


@_memoized
def _hook_names(cfg: BridgeConfig, optional: frozenset[str] = frozenset()) -> tuple[str, ...]:
    from .architectures import family_for  # the families import this module

    family_names = family_for(cfg).hook_names
    if family_names is not None:  # a family with its own forward (an encoder: HookedEncoder's names)
        return tuple(family_names(cfg))
    names = ["embed.ln.hook_scale", "embed.ln.hook_normalized"] if cfg.post_embedding_ln else []
    names.append("hook_embed")
    if cfg.positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    for layer in range(cfg.n_layers):
        names.extend(layer_hook_names(cfg, layer).in_order(optional))
    if cfg.final_norm:
        names += ["ln_final.hook_scale", "ln_final.hook_normalized"]
    names += ["unembed.hook_in", "unembed.hook_out"]
    return tuple(names)


@_memoized
def _valid_names(cfg: BridgeConfig) -> frozenset[str]:
    """Every name a hook may be attached to: the default hook points and the optional ones."""
    return frozenset(_hook_names(cfg, frozenset(OPTIONAL_HOOKS)))


def hook_names(cfg: BridgeConfig, optional: Collection[str] = ()) -> list[str]:
    """Every hook point of a model with this config, in execution order; ``optional`` adds the
    hook points of those HookedTransformer flags (OPTIONAL_HOOKS keys, e.g. "use_attn_result")."""
    return list(_hook_names(cfg, _optional_flags(optional)))


def unknown_hook_error(name: str, cfg: BridgeConfig) -> KeyError:
    """A KeyError naming an unknown hook point, with the closest valid names."""
    message = f"unknown hook point {name!r} for this {cfg.original_architecture} model"
    suffix = name.rsplit(".", 1)[-1]
    if suffix in _NOT_PROVIDED:
        message += f" ({suffix} is a TransformerLens hook point not provided: {_NOT_PROVIDED[suffix]})"
    elif suffix == "hook_attn_in" and cfg.n_kv_heads != cfg.n_heads:
        message += f" ({_ATTN_IN_GQA})"
    close = difflib.get_close_matches(name, sorted(_valid_names(cfg)), n=5, cutoff=0.6)
    if close:
        message += f"; closest names: {', '.join(close)}"
    else:
        message += f"; see functional_bridge.hook_names(cfg) for all {len(_hook_names(cfg))}"
    return KeyError(message)


def select_names(
    cfg: BridgeConfig, name_or_filter: NameOrFilter | Sequence[str] | None, optional: Collection[str] = ()
) -> list[str]:
    """Hook names chosen by a name, a list of names, a predicate, or None (all of them).

    A name or list may name an optional hook point (``attn.hook_result``...) at any time; a
    predicate or None sees the optional hook points of the ``optional`` flags only."""
    if name_or_filter is None:
        return list(_hook_names(cfg, _optional_flags(optional)))
    if callable(name_or_filter):
        return [name for name in _hook_names(cfg, _optional_flags(optional)) if name_or_filter(name)]
    requested = [name_or_filter] if isinstance(name_or_filter, str) else list(name_or_filter)
    valid = _valid_names(cfg)
    for name in requested:
        if not isinstance(name, str):
            raise TypeError(f"hook names must be strings, got {type(name).__name__}: {name!r}")
        if name not in valid:
            raise unknown_hook_error(name, cfg)
    return requested


class HookSet:
    """Forward and backward hook functions by hook point name, resolved once per forward call.

    ``points`` may give the object each hook function receives as ``hook`` (the Bridge facade
    passes its registered hook points, with their ``ctx``); by default a HookPoint."""

    __slots__ = ("_table", "_bwd", "_points")

    def __init__(
        self,
        table: Mapping[str, Sequence[HookFn]] | None = None,
        bwd: Mapping[str, Sequence[HookFn]] | None = None,
        points: Mapping[str, object] | None = None,
    ):
        self._table = {name: tuple(fns) for name, fns in (table or {}).items() if fns}
        self._bwd = {name: tuple(fns) for name, fns in (bwd or {}).items() if fns}
        points = points or {}
        self._points = {name: points.get(name) or HookPoint(name) for name in {**self._table, **self._bwd}}

    def wants(self, name: str | None) -> bool:
        """Whether a forward or backward hook is attached at name (so it must be computed)."""
        return name in self._table or name in self._bwd

    def __bool__(self) -> bool:
        return bool(self._table) or bool(self._bwd)

    def names(self) -> list[str]:
        return list({**self._table, **self._bwd})

    def appended(self, names: Iterable[str], fn: HookFn) -> "HookSet":
        """A new HookSet that also calls fn, after the existing forward hooks, at each of names."""
        table = {name: list(fns) for name, fns in self._table.items()}
        for name in names:
            table.setdefault(name, []).append(fn)
        return HookSet(table, self._bwd, self._points)

    def combined(self, other: "HookSet") -> "HookSet":
        """A new HookSet running this one's hooks, then other's, at each name."""
        if not other:
            return self
        if not self:
            return other
        merge = lambda a, b: {n: [*a.get(n, ()), *b.get(n, ())] for n in {**a, **b}}  # noqa: E731
        return HookSet(merge(self._table, other._table), merge(self._bwd, other._bwd), {**other._points, **self._points})

    def __call__(self, name: str | None, activation: Tensor) -> Tensor:
        fns = self._table.get(name)
        if fns is not None:
            activation = _run_forward_hooks(name, activation, fns, self._points[name])
        bwd = self._bwd.get(name)
        if bwd is not None and activation.requires_grad:
            activation.register_hook(_backward_hook(name, activation, bwd, self._points[name]))
        return activation


def _run_forward_hooks(name: str, activation: Tensor, fns: Sequence[HookFn], point) -> Tensor:
    for fn in fns:
        result = fn(activation, point)
        if result is None:
            continue
        if not isinstance(result, Tensor):
            raise TypeError(
                f"hook on {name!r} returned {type(result).__name__}; a hook returns a tensor "
                "that replaces the activation, or None"
            )
        if result.shape != activation.shape:
            raise ValueError(
                f"hook on {name!r} returned shape {tuple(result.shape)}, "
                f"but the activation has shape {tuple(activation.shape)}"
            )
        if result.dtype != activation.dtype or result.device != activation.device:
            raise TypeError(
                f"hook on {name!r} returned a {result.dtype} tensor on {result.device}, but the "
                f"activation is {activation.dtype} on {activation.device}; return "
                "result.to(activation.dtype) (or .to(activation.device))"
            )
        activation = result
    return activation


def _backward_hook(name: str, activation: Tensor, fns: Sequence[HookFn], point):
    """An autograd tensor hook running TransformerLens backward hooks: each gets the gradient of
    the activation and may return a replacement (a tensor or a 1-tuple, as TL allows); as in TL,
    each sees the incoming gradient and the last replacement wins."""
    shape = activation.shape

    def on_grad(grad: Tensor):
        replacement = None
        for fn in fns:
            result = fn(grad, point)
            if isinstance(result, tuple) and len(result) == 1:
                result = result[0]
            if result is None:
                continue
            if not isinstance(result, Tensor) or result.shape != shape:
                got = tuple(result.shape) if isinstance(result, Tensor) else type(result).__name__
                raise ValueError(f"backward hook on {name!r} returned {got}; it must return a gradient of shape {tuple(shape)} or None")
            replacement = result
        return replacement

    return on_grad


NO_HOOKS = HookSet()


def resolve_hooks(
    cfg: BridgeConfig,
    hooks: HookSet | Iterable[tuple[NameOrFilter, HookFn]] | None,
    bwd_hooks: Iterable[tuple[NameOrFilter, HookFn]] = (),
    optional: Collection[str] = (),
) -> HookSet:
    """Turn ``[(name or predicate, fn), ...]`` (and backward hooks alike) into a HookSet,
    checking every name; predicates see the optional hook points of ``optional`` flags."""
    bwd_hooks = list(bwd_hooks or ())
    if hooks is None and not bwd_hooks:
        return NO_HOOKS
    if isinstance(hooks, HookSet):
        if bwd_hooks:
            raise TypeError("pass backward hooks inside the HookSet when hooks is a HookSet")
        return hooks
    return HookSet(_table(cfg, hooks or (), optional), _table(cfg, bwd_hooks, optional))


def _table(cfg: BridgeConfig, hooks: Iterable, optional: Collection[str]) -> dict[str, list[HookFn]]:
    table: dict[str, list[HookFn]] = {}
    for entry in hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"each hook must be a (name or predicate, fn) pair, got {entry!r}")
        name_or_filter, fn = entry
        if not callable(fn):
            raise TypeError(f"hook function for {name_or_filter!r} is not callable: {fn!r}")
        for name in select_names(cfg, name_or_filter, optional):
            table.setdefault(name, []).append(fn)
    return table
