"""Hook points: HookedTransformer's names for a config, and hooks resolved for one forward call.

A hook is TransformerLens's: ``fn(activation, hook) -> activation or None`` where ``hook.name``
is the hook point's name; a returned tensor replaces the activation downstream. Hooks live only
for the call they are passed to (nothing is registered on an object), which is what lets a
hooked forward run inside vmap, grad and torch.compile.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import Tensor

from .config import BridgeConfig

HookFn = Callable[[Tensor, "HookPoint"], Union[Tensor, None]]
NameOrFilter = Union[str, Callable[[str], bool]]

# TransformerLens hook points that HookedTransformer only creates behind options we do not
# emulate, with what to use instead.
_TL_OPTIONAL_HOOKS = {
    "hook_result": "per-head outputs are hook_z @ W_O: use ActivationCache.stack_head_results",
    "hook_attn_in": "the attention input is ln1.hook_normalized scaled by ln1.w and ln1.b",
    "hook_q_input": "the attention input is ln1.hook_normalized scaled by ln1.w and ln1.b",
    "hook_k_input": "the attention input is ln1.hook_normalized scaled by ln1.w and ln1.b",
    "hook_v_input": "the attention input is ln1.hook_normalized scaled by ln1.w and ln1.b",
    "hook_mlp_in": "the MLP input is ln2.hook_normalized scaled by ln2.w and ln2.b",
    "hook_tokens": "tokens are the forward's input",
}


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
    ln1_post_scale: str | None  # a norm on the attention output (Gemma 2's ln1_post, OLMo 2's ln1)
    ln1_post_normalized: str | None
    attn_out: str
    ln1_resid_scale: str | None  # a norm on resid_pre + attn_out (OPT's post-LN)
    ln1_resid_normalized: str | None
    resid_mid: str | None
    ln2_scale: str | None
    ln2_normalized: str | None
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

    def in_order(self) -> list[str]:
        """Names in execution order (the order HookedTransformer fills its cache)."""
        names = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                names.extend(value)
            elif value:
                names.append(value)
        return names


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
        ln1_post_scale=_norm_names(ln1_post)[0],
        ln1_post_normalized=_norm_names(ln1_post)[1],
        attn_out=p + "hook_attn_out",
        ln1_resid_scale=_norm_names(ln1_resid)[0],
        ln1_resid_normalized=_norm_names(ln1_resid)[1],
        resid_mid=None if cfg.parallel_attn_mlp else p + "hook_resid_mid",
        ln2_scale=_norm_names(ln2)[0],
        ln2_normalized=_norm_names(ln2)[1],
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


@_memoized
def _hook_names(cfg: BridgeConfig) -> tuple[str, ...]:
    from .architectures import family_for  # the families import this module

    family_names = family_for(cfg).hook_names
    if family_names is not None:  # a family with its own forward (an encoder: HookedEncoder's names)
        return tuple(family_names(cfg))
    names = ["embed.ln.hook_scale", "embed.ln.hook_normalized"] if cfg.post_embedding_ln else []
    names.append("hook_embed")
    if cfg.positional_embedding_type == "standard":
        names.append("hook_pos_embed")
    for layer in range(cfg.n_layers):
        names.extend(layer_hook_names(cfg, layer).in_order())
    if cfg.final_norm:
        names += ["ln_final.hook_scale", "ln_final.hook_normalized"]
    names += ["unembed.hook_in", "unembed.hook_out"]
    return tuple(names)


def hook_names(cfg: BridgeConfig) -> list[str]:
    """Every hook point of a model with this config, in execution order."""
    return list(_hook_names(cfg))


def unknown_hook_error(name: str, cfg: BridgeConfig) -> KeyError:
    """A KeyError naming an unknown hook point, with the closest valid names."""
    message = f"unknown hook point {name!r} for this {cfg.original_architecture} model"
    suffix = name.rsplit(".", 1)[-1]
    if suffix in _TL_OPTIONAL_HOOKS:
        message += f" ({suffix} is a TransformerLens option not provided: {_TL_OPTIONAL_HOOKS[suffix]})"
    close = difflib.get_close_matches(name, _hook_names(cfg), n=5, cutoff=0.6)
    if close:
        message += f"; closest names: {', '.join(close)}"
    else:
        message += f"; see functional_bridge.hook_names(cfg) for all {len(_hook_names(cfg))}"
    return KeyError(message)


def select_names(cfg: BridgeConfig, name_or_filter: NameOrFilter | Sequence[str] | None) -> list[str]:
    """Hook names chosen by a name, a list of names, a predicate, or None (all of them)."""
    all_names = _hook_names(cfg)
    if name_or_filter is None:
        return list(all_names)
    if callable(name_or_filter):
        return [name for name in all_names if name_or_filter(name)]
    requested = [name_or_filter] if isinstance(name_or_filter, str) else list(name_or_filter)
    valid = set(all_names)
    for name in requested:
        if not isinstance(name, str):
            raise TypeError(f"hook names must be strings, got {type(name).__name__}: {name!r}")
        if name not in valid:
            raise unknown_hook_error(name, cfg)
    return requested


class HookSet:
    """Hook functions by hook point name, resolved once per forward call."""

    __slots__ = ("_table", "_points")

    def __init__(self, table: Mapping[str, Sequence[HookFn]] | None = None):
        self._table = {name: tuple(fns) for name, fns in (table or {}).items() if fns}
        self._points = {name: HookPoint(name) for name in self._table}

    def wants(self, name: str | None) -> bool:
        return name in self._table

    def __bool__(self) -> bool:
        return bool(self._table)

    def names(self) -> list[str]:
        return list(self._table)

    def appended(self, names: Iterable[str], fn: HookFn) -> "HookSet":
        """A new HookSet that also calls fn, after the existing hooks, at each of names."""
        table = {name: list(fns) for name, fns in self._table.items()}
        for name in names:
            table.setdefault(name, []).append(fn)
        return HookSet(table)

    def __call__(self, name: str | None, activation: Tensor) -> Tensor:
        fns = self._table.get(name)
        if fns is None:
            return activation
        point = self._points[name]
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


NO_HOOKS = HookSet()


def resolve_hooks(
    cfg: BridgeConfig, hooks: HookSet | Iterable[tuple[NameOrFilter, HookFn]] | None
) -> HookSet:
    """Turn ``[(name or predicate, fn), ...]`` into a HookSet, checking every name."""
    if hooks is None:
        return NO_HOOKS
    if isinstance(hooks, HookSet):
        return hooks
    table: dict[str, list[HookFn]] = {}
    for entry in hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"each hook must be a (name or predicate, fn) pair, got {entry!r}")
        name_or_filter, fn = entry
        if not callable(fn):
            raise TypeError(f"hook function for {name_or_filter!r} is not callable: {fn!r}")
        for name in select_names(cfg, name_or_filter):
            table.setdefault(name, []).append(fn)
    return HookSet(table)
