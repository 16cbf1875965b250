"""The params pytree: HF names -> HF leaf tensors, the only state a model has.

Structure checks with errors that name every missing, extra or misshapen leaf; the dtype and
device read off the leaves; stacking and unstacking for ensembles (optree, which keeps the
dicts' insertion order, i.e. HF's order).
"""

from __future__ import annotations

import sys
from typing import Mapping, Sequence

import optree
import torch
from torch import Tensor

from .architectures import family_for
from .config import BridgeConfig

Params = Mapping[str, Tensor]


class ParamsStructureError(ValueError):
    """A params pytree does not match the leaves its config needs."""


class ShardedParamsError(RuntimeError):
    """A computation that needs whole leaves was given FSDP2 shards (DTensors)."""


def sharded_leaves(params: Params) -> list[str]:
    """Names of the leaves that are DTensors (FSDP2 shards), in order. Skipped when
    torch.distributed.tensor was never imported (then no leaf can be one); transformers imports
    it, so in practice one isinstance per leaf (~40 us for 150 leaves, per forward)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return []
    return [name for name, value in params.items() if isinstance(value, module.DTensor)]


def refuse_sharded(params: Params, what: str) -> None:
    """Raise ShardedParamsError naming the sharded leaves and the ways out, if there are any."""
    names = sharded_leaves(params)
    if names:
        raise ShardedParamsError(
            f"{what} needs whole leaves, but {_short_list(names)} are FSDP2 shards (DTensors): run the sharded "
            "bridge through bridge(...) / bridge.run_with_cache(...), which gather one block at a time, or "
            "gather every leaf on every rank with functional_bridge.distributed.full_params(bridge) "
            "(a collective: call it on all ranks)"
        )


def check_params(params: Params, cfg: BridgeConfig) -> None:
    """Raise ParamsStructureError naming every missing, extra or misshapen leaf."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of HF names to tensors, got {type(params).__name__}")
    family = family_for(cfg)
    required = family.param_shapes(cfg)
    optional = family.extra_param_shapes(cfg)
    problems = []
    missing = [name for name in required if name not in params]
    if missing:
        problems.append(f"missing leaves: {_short_list(missing)}")
    extra = [name for name in params if name not in required and name not in optional]
    if extra:
        problems.append(f"unexpected leaves: {_short_list(extra)}")
    for name, value in params.items():
        want = required[name] if name in required else optional.get(name)
        if want is None:
            continue
        if not isinstance(value, Tensor):
            problems.append(f"{name} is a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != want:
            problems.append(f"{name} has shape {tuple(value.shape)}, expected {want}")
    if problems:
        shown = problems[:8] + ([f"... ({len(problems)} problems in all)"] if len(problems) > 8 else [])
        raise ParamsStructureError(
            f"params do not match the {cfg.original_architecture} config "
            f"(n_layers={cfg.n_layers}, d_model={cfg.d_model}): " + "; ".join(shown)
        )


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def params_device(params: Params) -> torch.device:
    """The one device every leaf is on; a clear error if they are spread over several."""
    devices = {}
    for name, value in params.items():
        devices.setdefault(value.device, name)
    if len(devices) > 1:
        listed = ", ".join(f"{device} (e.g. {name})" for device, name in devices.items())
        raise ValueError(f"params are on mixed devices: {listed}; move them with .to(device)")
    if not devices:
        raise ValueError("params is empty")
    return next(iter(devices))


def params_dtype(params: Params) -> torch.dtype:
    """The floating dtype of the leaves; a clear error if they disagree."""
    dtypes = {}
    for name, value in params.items():
        if value.is_floating_point():
            dtypes.setdefault(value.dtype, name)
    if len(dtypes) > 1:
        listed = ", ".join(f"{dtype} (e.g. {name})" for dtype, name in dtypes.items())
        raise ValueError(f"params have mixed dtypes: {listed}; convert them with .to(dtype)")
    if not dtypes:
        raise ValueError("params hold no floating-point tensor")
    return next(iter(dtypes))


def stack_params(members: Sequence[Params]) -> dict[str, Tensor]:
    """K params pytrees with one structure -> one pytree whose leaves have a leading [K] axis,
    for ``vmap(..., in_dims=(0, ...))`` over an ensemble. Tied weights stay single leaves.

    The stacked leaves are new leaf tensors (requiring grad if the members' leaves do), so one
    optimizer can train all K members at once."""
    members = list(members)
    if not members:
        raise ValueError("stack_params needs at least one params pytree")
    first = dict(members[0])
    for index, member in enumerate(members[1:], start=1):
        if list(member) != list(first):
            missing = [n for n in first if n not in member]
            extra = [n for n in member if n not in first]
            raise ParamsStructureError(
                f"params {index} differs in structure from params 0: "
                f"missing {_short_list(missing) or 'none'}, extra {_short_list(extra) or 'none'}"
            )
        for name, value in member.items():
            if value.shape != first[name].shape:
                raise ParamsStructureError(
                    f"params {index} leaf {name} has shape {tuple(value.shape)}, "
                    f"params 0 has {tuple(first[name].shape)}"
                )
    def stack(*leaves: Tensor) -> Tensor:
        requires_grad = any(leaf.requires_grad for leaf in leaves)
        return torch.stack(leaves).detach().requires_grad_(requires_grad)

    return optree.tree_map(stack, first, *[dict(m) for m in members[1:]])


def unstack_params(stacked: Params) -> list[dict[str, Tensor]]:
    """Inverse of stack_params: views of each member's slice of the leading axis."""
    sizes = {value.shape[0] if value.dim() else None for value in stacked.values()}
    if len(sizes) != 1 or None in sizes:
        raise ParamsStructureError(f"stacked leaves disagree on the leading (member) axis: sizes {sizes}")
    (size,) = sizes
    return [optree.tree_map(lambda leaf, i=i: leaf[i], dict(stacked)) for i in range(size)]
