"""FSDP2 over a Bridge: torch's ``fully_shard`` on each block's container module, then on the bridge.

The module tree mirrors HF's names, so ``transformer.h.3`` (``model.layers.3``...) is the container
of block 3's leaves: ``fully_shard`` on it makes those leaves one FSDP2 group, and on the bridge
makes the rest (embedding, final norm, unembedding) the root group. Every leaf becomes a DTensor
shard (dim 0 over the mesh): parameter memory per rank is ~1/world, and ``bridge.parameters()``
hands the shards to any torch optimizer.

The forward routes each block through its container (model.transformer's ``run_block``): calling
the container fires FSDP2's pre-forward hook, which all-gathers that block's leaves; the pure
block function runs on them, read live from the tree (``bridge.params``); the post-forward hook
reshards them. In backward FSDP2's pre-backward hook (on the block's output) gathers them again
and its post-backward hook (on the block's input) reduce-scatters the gradients into the shards.
So one block's whole leaves exist at a time, forward and backward, with hooks and caches
unchanged: activations are plain tensors. The root group is gathered around the whole call by
the bridge's own FSDP2 hook. The pure ``fb.forward(params, ...)`` is untouched; given shards it
refuses by name (params.refuse_sharded), as do ``tl_parameters()`` and the stacked ``W_Q``...
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..architectures import family_for


class BlockContainer(nn.Module):
    """A block's container (``transformer.h.3``). Calling it runs ``run(resid)`` inside the
    module's call, so that module hooks (FSDP2's gather and reshard) wrap the block."""

    def forward(self, run, resid: Tensor) -> Tensor:  # resid [batch, pos, d_model]
        return run(resid)


class _BlockRunner:
    """model.transformer's run_block for a sharded bridge: block ``layer`` through its container,
    on the leaves the container holds during the call (gathered by FSDP2's hook)."""

    def __init__(self, bridge: nn.Module, blocks: list[nn.Module]):
        self.bridge, self.blocks = bridge, blocks

    def __call__(self, layer: int, step, resid: Tensor) -> Tensor:
        bridge = self.bridge
        return self.blocks[layer](lambda r: step(r, bridge.params), resid)


def block_containers(bridge: nn.Module) -> list[nn.Module]:
    """The container module of each block, in layer order: the children of the first module
    (pre-order) whose children are named exactly "0" ... "n_layers - 1" (``transformer.h``,
    ``model.layers``)."""
    want = [str(layer) for layer in range(bridge.cfg.n_layers)]
    for _, module in bridge.named_modules():
        if list(module._modules) == want:
            return [module._modules[name] for name in want]
    raise ValueError(f"no module of this {bridge.cfg.original_architecture} bridge holds the blocks 0..{len(want) - 1}")


def is_sharded(bridge: nn.Module) -> bool:
    """True after fully_shard_bridge(bridge)."""
    return "_run_block" in bridge.__dict__


def fully_shard_bridge(bridge: nn.Module, **fsdp_kwargs) -> nn.Module:
    """Shard ``bridge`` in place with ``torch.distributed.fsdp.fully_shard``: each block's container,
    then the bridge (the root). fsdp_kwargs go to every fully_shard call (mesh, mp_policy,
    offload_policy...); reshard_after_forward defaults to True for the root too, so that between
    calls every leaf is a shard. Needs an initialised process group (or a mesh). Returns bridge.
    Run it through ``bridge(...)`` / ``bridge.run_with_cache(...)``; train it with any optimizer
    over ``bridge.parameters()`` (built after sharding)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(bridge):
        raise ValueError("this bridge is already sharded (fully_shard_bridge was called on it)")
    family = family_for(bridge.cfg)
    if family.forward is not None:
        raise NotImplementedError(
            f"fully_shard_bridge: {bridge.cfg.original_architecture} runs its own forward ({family.name}), "
            "which does not route its blocks through their containers"
        )
    policy = fsdp_kwargs.get("mp_policy")
    if getattr(policy, "param_dtype", None) not in (None, bridge.dtype):
        raise NotImplementedError(
            f"fully_shard_bridge: mp_policy.param_dtype={policy.param_dtype} differs from the leaves' {bridge.dtype}; the forward "
            "reads one dtype off the leaves (the root's would be cast, the blocks' not yet): store the leaves in that dtype "
            "before sharding (bridge.to(dtype))"
        )
    if "mesh" not in fsdp_kwargs and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fully_shard_bridge needs an initialised process group (torch.distributed.init_process_group) or a mesh")
    fsdp_kwargs.setdefault("reshard_after_forward", True)
    blocks = block_containers(bridge)
    odd = [type(module).__name__ for module in blocks if type(module) is not nn.Module]
    if odd:
        raise TypeError(f"the blocks' containers must be plain nn.Module containers, got {sorted(set(odd))}")
    for module in blocks:
        module.__class__ = BlockContainer  # a forward of its own: the call FSDP2's hooks wrap
        fully_shard(module, **fsdp_kwargs)
    fully_shard(bridge, **fsdp_kwargs)
    bridge.__dict__["_run_block"] = _BlockRunner(bridge, blocks)
    return bridge


def _reshard_all(bridge: nn.Module) -> None:
    """Every FSDP2 group back to shards (a root left gathered after an inference call)."""
    from torch.distributed.fsdp import FSDPModule

    for module in bridge.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _whole_leaves(bridge: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(HF name, a new whole detached copy of the leaf), one leaf gathered at a time (DTensor's
    all-gather): a collective on a sharded bridge."""
    from torch.distributed.tensor import DTensor

    if is_sharded(bridge):
        _reshard_all(bridge)
    for name, leaf in bridge.params.items():
        yield name, leaf.detach().full_tensor() if isinstance(leaf, DTensor) else leaf.detach().clone()


def full_params(bridge: nn.Module) -> dict[str, Tensor]:
    """HF name -> whole leaf (new tensors, detached), in HF order, on every rank. A collective on a
    sharded bridge: every rank must call it. Peak memory: the whole model on every rank."""
    return dict(_whole_leaves(bridge))


def gathered_bridge(bridge: nn.Module, rank: int | None = None):
    """A plain (unsharded) Bridge over whole copies of a sharded bridge's leaves, with its config,
    HF config, tokenizer and TL settings: on every rank (rank=None), or on ``rank`` only (None
    elsewhere, where one gathered leaf at a time is held). A collective: every rank must call it.
    tl_parameters(), W_Q..., to_hf() and the pure functions work on it."""
    import copy

    from ..bridge import Bridge

    keep = rank is None or dist.get_rank() == rank
    trainable = {name: leaf.requires_grad for name, leaf in bridge.params.items()}
    leaves = {name: nn.Parameter(leaf, requires_grad=trainable[name]) for name, leaf in _whole_leaves(bridge) if keep}
    if not keep:
        return None
    plain = Bridge(leaves, bridge._config, copy.deepcopy(bridge._hf_config), bridge.tokenizer)
    plain._tl = copy.copy(bridge._tl)
    return plain


def export_hf(bridge: nn.Module, rank: int = 0):
    """A plain HF model (HF's class, HF's keys) holding whole copies of the leaves, built on
    ``rank`` (None elsewhere). A collective: every rank must call it."""
    plain = gathered_bridge(bridge, rank)
    return None if plain is None else plain.to_hf()
