"""Checkpoints through ``torch.distributed.checkpoint`` (DCP), keyed by HF names.

The state saved is the params pytree itself, ``{HF name: leaf}``, so a checkpoint written by a
sharded bridge on N ranks loads into a sharded bridge on M ranks, or into a plain bridge in one
process (DCP reshards: each rank reads what its leaves hold). Keys and shapes are checked
against the checkpoint's metadata before anything is read, so a mismatch changes nothing.
"""

from __future__ import annotations

import os

import torch.distributed.checkpoint as dcp
from torch import nn

from ..params import ParamsStructureError
from .fsdp import _reshard_all, is_sharded


def _state(bridge: nn.Module) -> dict:
    """{HF name: detached leaf}: what DCP writes from, or reads into (in place)."""
    if is_sharded(bridge):
        _reshard_all(bridge)
    return {name: leaf.detach() for name, leaf in bridge.params.items()}


def save_checkpoint(bridge: nn.Module, path: str | os.PathLike) -> None:
    """Write the leaves under their HF names to the directory ``path`` (dcp.save). A collective
    on a sharded bridge: every rank calls it; each writes its shards."""
    dcp.save(_state(bridge), checkpoint_id=os.fspath(path))


def load_checkpoint(bridge: nn.Module, path: str | os.PathLike) -> None:
    """Read a checkpoint written by save_checkpoint into the leaves, in place (dcp.load): any
    sharding on either side. Refuses, changing nothing, when names or shapes differ. A
    collective on a sharded bridge."""
    path = os.fspath(path)
    state = _state(bridge)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = [name for name in state if name not in saved]
    extra = [name for name in saved if name not in state]
    wrong = [
        f"{name} is {tuple(saved[name].size)} in the checkpoint, {tuple(value.shape)} here"
        for name, value in state.items()
        if name in saved and tuple(getattr(saved[name], "size", ())) != tuple(value.shape)
    ]
    if missing or extra or wrong:
        problems = [f"missing from the checkpoint: {missing}"] * bool(missing) + [f"not in this model: {extra}"] * bool(extra) + wrong
        raise ParamsStructureError(f"load_checkpoint refused, nothing was changed ({path}): " + "; ".join(problems))
    dcp.load(state, checkpoint_id=path)
