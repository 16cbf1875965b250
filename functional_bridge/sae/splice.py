"""Splicing SAEs into the pure forward: a hook at each SAE's output hook, and the hook names the
model then has. Pure: the spliced SAEs are data passed per call; nothing is registered anywhere.

As SAELens's HookedSAETransformer (6.54): an SAE reading and writing hook ``H`` replaces ``H``'s
activation by its output, and ``H`` stops being a hook point; in its place come
``H.hook_sae_input``, ``H.hook_sae_acts_pre``, ``H.hook_sae_acts_post``, ``H.hook_sae_recons``,
``H.hook_sae_error`` (with the error term) and ``H.hook_sae_output``, fired in that order. A
transcoder reads its input hook (which stays a hook point) and is spliced at its output hook,
under whose name its hooks appear. With ``use_error_term`` the output is the SAE's output plus
``original - sae(original)``, the latter computed without the SAE's hooks and detached, so with
no edits the model's output is reproduced up to one rounding per spliced activation, and edits
at the SAE's hooks (ablating a feature) show through it.

Where this differs from SAELens, deliberately: a skip transcoder's ``W_skip`` path is included
(SAELens's splice calls encode/decode and drops it); a transcoder reads its input hook's value
after every hook there (SAELens captures it when its own capture hook fires, before hooks
attached after it); the error term reuses the hooked reconstruction when no hook changed a value
inside the SAE (same numbers as recomputing it, without the second encode).
"""

from __future__ import annotations

import difflib
from functools import lru_cache
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from ..config import BridgeConfig
from ..hooks import OPTIONAL_HOOKS, HookSet, hook_names
from . import codec
from .sae import SAE

SAE_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_error", "hook_sae_output")
SAE_FLAG = "use_mlp_hook_in"  # SAE mode: HookedSAETransformer's blocks.L.mlp.hook_in is a hook point


class Splice(NamedTuple):
    """One SAE spliced in for a forward call. exclude: bool [batch, pos], True where the SAE is
    bypassed (the original activation flows on, with zero error), or None."""

    sae: SAE
    use_error_term: bool = False
    exclude: Tensor | None = None


def spliced_names(cfg: BridgeConfig, output_hooks: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
    """Every hook name of the model with SAEs spliced at output_hooks, in execution order
    (HookedSAETransformer's hook_dict order): the model's (with blocks.L.mlp.hook_in), each output
    hook replaced by its SAE's six hook names."""
    return list(_spliced_names(cfg, tuple(output_hooks), frozenset({*optional, SAE_FLAG})))


@lru_cache(maxsize=256)
def _spliced_names(cfg: BridgeConfig, output_hooks: tuple[str, ...], optional: frozenset[str]) -> tuple[str, ...]:
    spliced = set(output_hooks)
    names = []
    for name in hook_names(cfg, tuple(sorted(optional))):
        names.extend([f"{name}.{h}" for h in SAE_HOOKS] if name in spliced else [name])
    return tuple(names)


@lru_cache(maxsize=256)
def _valid_names(cfg: BridgeConfig, output_hooks: tuple[str, ...]) -> frozenset[str]:
    """Every name a hook may be attached to (the optional hook points included)."""
    names = _spliced_names(cfg, output_hooks, frozenset(OPTIONAL_HOOKS))
    return frozenset(n for n in names if "hook_attn_in" not in n or cfg.n_kv_heads == cfg.n_heads)


def select_spliced(cfg: BridgeConfig, output_hooks: Sequence[str], name_or_filter, optional: Sequence[str] = ()) -> list[str]:
    """select_names over the spliced model's names: a name, a list, a predicate or None (all)."""
    if name_or_filter is None:
        return spliced_names(cfg, output_hooks, optional)
    if callable(name_or_filter):
        return [name for name in spliced_names(cfg, output_hooks, optional) if name_or_filter(name)]
    requested = [name_or_filter] if isinstance(name_or_filter, str) else list(name_or_filter)
    valid = _valid_names(cfg, tuple(output_hooks))
    for name in requested:
        if not isinstance(name, str):
            raise TypeError(f"hook names must be strings, got {type(name).__name__}: {name!r}")
        if name not in valid:
            close = difflib.get_close_matches(name, sorted(valid), n=5, cutoff=0.6)
            spliced = f" ({name} has an SAE spliced in: hook {name}.hook_sae_input ... instead)" if name in output_hooks else ""
            raise KeyError(f"unknown hook point {name!r} with the SAEs spliced at {list(output_hooks)}{spliced}"
                           + (f"; closest names: {', '.join(close)}" if close else ""))  # fmt: skip
    return requested


class SplicedHooks:
    """A HookSet's interface over the user's hooks (keyed by the spliced model's names) with the
    SAEs spliced at their output hooks. Built per forward call; holds that call's captured
    transcoder inputs."""

    def __init__(self, inner: HookSet, splices: Sequence[Splice]):
        self.inner = inner
        self.at_output: dict[str, Splice] = {}
        self.inputs: dict[str, str] = {}  # transcoder input hook -> its output hook
        for splice in splices:
            cfg = splice.sae.cfg
            self.at_output[cfg.output_hook] = splice
            if cfg.output_hook != cfg.hook_name:
                self.inputs[cfg.hook_name] = cfg.output_hook
        self.captured: dict[str, Tensor] = {}

    def wants(self, name: str | None) -> bool:
        return name in self.at_output or name in self.inputs or self.inner.wants(name)

    def __bool__(self) -> bool:
        return True

    def __call__(self, name: str | None, activation: Tensor) -> Tensor:
        splice = self.at_output.get(name)
        if splice is not None:
            return self._splice(name, activation, splice)
        activation = self.inner(name, activation)
        if name in self.inputs:
            self.captured[self.inputs[name]] = activation
        return activation

    def _splice(self, name: str, original: Tensor, splice: Splice) -> Tensor:
        sae, cfg = splice.sae, splice.sae.cfg
        x = original if cfg.output_hook == cfg.hook_name else self.captured.pop(name, None)
        if x is None:
            raise RuntimeError(f"transcoder into {name!r} did not see its input hook {cfg.hook_name!r} in this forward")
        width = x.shape[-2] * x.shape[-1] if cfg.reshape_activations == "hook_z" else x.shape[-1]
        if width != cfg.d_in:
            raise ValueError(f"SAE at {cfg.hook_name!r} has d_in={cfg.d_in}, but the activation there is {tuple(x.shape)}")
        changed = []

        def hook(short: str, t: Tensor) -> Tensor:
            out = self.inner(f"{name}.{short}", t)
            if out is not t:
                changed.append(short)
            return out

        d_head = original.shape[-1] if cfg.reshape_activations == "hook_z" else None
        out = codec.decode(sae.params, codec.encode(sae.params, x, cfg, hook), cfg, hook, d_head)
        if cfg.has_skip:
            out = out + codec.skip_term(sae.params, x)
        mask = splice.exclude
        if mask is not None:
            mask = mask.view(*mask.shape, *(1,) * (original.dim() - mask.dim()))
        if splice.use_error_term:
            with torch.no_grad():
                clean = codec.forward(sae.params, x, cfg) if changed else out.detach()
                error = original - clean
                if mask is not None:
                    error = torch.where(mask, torch.zeros_like(error), error)
                error = self.inner(f"{name}.hook_sae_error", error)
            out = out + error
        if mask is not None:
            out = torch.where(mask, original, out)
        return self.inner(f"{name}.hook_sae_output", out.to(original.dtype))


def check_splices(cfg: BridgeConfig, splices: Sequence[Splice]) -> None:
    """Each SAE's hooks exist in the model, and no two SAEs write one hook."""
    valid = set(hook_names(cfg, ("use_attn_result", "use_hook_mlp_in", SAE_FLAG)))
    outputs = set()
    for splice in splices:
        c = splice.sae.cfg
        for role, name in (("input", c.hook_name), ("output", c.output_hook)):
            if name not in valid:
                close = difflib.get_close_matches(str(name), sorted(valid), n=3, cutoff=0.6)
                raise KeyError(f"SAE {role} hook {name!r} is not a hook point of this model" + (f"; closest: {', '.join(close)}" if close else ""))
        if c.output_hook in outputs:
            raise ValueError(f"two SAEs write {c.output_hook!r}; splice one per hook")
        outputs.add(c.output_hook)
