"""Placement by layer: a params pytree whose leaves sit on several devices, whole blocks at a time
(what HF's ``device_map="auto"`` produces: the first blocks on one GPU, the next on another, the
rest offloaded to CPU), and what the forward needs to run it.

The rule: the embedding's leaves share one device (the inputs go there), each block's leaves share
one device, and the final norm and unembedding share one. The forward moves the residual stream
to each block's device, and the per-forward tables (attention masks, rotary tables) with it.
Splitting one block over devices is refused by name. ``place_leaves`` puts a pytree where an
HF-style device map says.

The pure forward stays pure: which device a block is on is read off its leaves (never off a
value), and ``.to(device)`` is an op like any other (the identity on the same device), so vmap,
grad and compile see nothing new; a single-device pytree takes exactly the old path.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import optree
import torch
from torch import Tensor

from .architectures import family_for
from .config import BridgeConfig
from .params import Params, params_device

DeviceMap = Mapping[str, "str | int | torch.device"]


def input_device(params: Params, cfg: BridgeConfig) -> torch.device:
    """The device inputs (tokens, masks) must be on: the one device of every leaf, or, for leaves
    placed by layer, the embedding's. Leaves spread in any other way get params_device's error,
    or one naming the group (embedding, block, unembedding) that is split."""
    devices = {value.device for value in params.values()}
    if len(devices) == 1:
        return next(iter(devices))
    if not devices:
        return params_device(params)  # its error for empty params
    return layer_placement(params, cfg)[0]


def layer_placement(params: Params, cfg: BridgeConfig) -> tuple[torch.device, list[torch.device], torch.device]:
    """(embedding's device, each block's device, unembedding's device) of params placed by layer;
    ValueError naming the first group whose leaves sit on more than one device."""
    family = family_for(cfg)
    if family.forward is not None:  # an encoder's own forward does not move between blocks
        params_device(params)
    names = {id(value): name for name, value in params.items()}
    groups = [("the embedding", family.embed_weights(params, cfg))]
    groups += [(f"block {layer}", family.layer_weights(params, cfg, layer)) for layer in range(cfg.n_layers)]
    groups.append(("the unembedding (final norm and head)", family.unembed_weights(params, cfg)))
    found = []
    for label, weights in groups:
        leaves = [leaf for leaf in optree.tree_leaves(weights, none_is_leaf=False) if isinstance(leaf, Tensor)]
        where = {}
        for leaf in leaves:
            where.setdefault(leaf.device, names.get(id(leaf), "a derived tensor"))
        if len(where) != 1:
            listed = ", ".join(f"{device} (e.g. {name})" for device, name in where.items())
            raise ValueError(
                f"params are on mixed devices: {listed}, within {label}: a forward can place whole blocks "
                f"on devices (a device map by layer), not split one; move them with .to(device) or place_leaves"
            )
        found.append(next(iter(where)))
    return found[0], found[1:-1], found[-1]


def block_device(weights) -> torch.device:
    """The device of a block's leaves (LayerWeights) or the unembedding's (UnembedWeights), read
    off one leaf: layer_placement checked that each group's leaves share one device."""
    return weights.attn.o.weight.device if hasattr(weights, "attn") else weights.unembed.weight.device


def moved(table: NamedTuple, device: torch.device) -> NamedTuple:
    """An attention mask or rotary table with its tensors on ``device`` (the other fields kept)."""
    return type(table)(*(field.to(device) if isinstance(field, Tensor) else field for field in table))


class TableCache:
    """Per-forward tables (masks, rotary tables) built once on the input device and copied once
    to each other device a block needs them on."""

    def __init__(self):
        self._tables: dict = {}

    def get(self, key, device: torch.device, build):
        here = self._tables.get((key, device))
        if here is None:
            home = next((table for (k, _), table in self._tables.items() if k == key), None)
            here = moved(build() if home is None else home, device)
            self._tables[(key, device)] = here
        return here


def _device(device) -> str:
    return str(torch.device(f"cuda:{device}" if isinstance(device, int) else device))


def place_leaves(params: Params, device_map: DeviceMap) -> dict[str, Tensor]:
    """A new params pytree with each leaf on the device of the longest prefix of its HF name in
    ``device_map`` (HF's ``hf_device_map`` form: ``{"model.embed_tokens": 0, "model.layers.0": 0,
    ..., "lm_head": "cpu"}``; an int is a CUDA index; ``""`` is the default). Leaves already there
    are kept (the same objects). Every leaf must be matched."""
    placed, unmatched = {}, []
    for name, value in params.items():
        prefix = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len, default=None)
        if prefix is None:
            unmatched.append(name)
            continue
        device = torch.device(_device(device_map[prefix]))
        placed[name] = value if value.device == device else value.detach().to(device).requires_grad_(value.requires_grad)
    if unmatched:
        raise ValueError(f"device_map places no prefix of {unmatched[:4]}{' ...' if len(unmatched) > 4 else ''}; add them (or a '' default)")
    return placed


def device_map_by_layer(params: Params, cfg: BridgeConfig, devices: Sequence, *, embed=None, unembed=None) -> dict[str, str]:
    """An HF-style device map giving block i ``devices[i * len(devices) // n_layers]`` (contiguous
    runs, as HF's balanced maps), the embedding ``embed`` (default the first block's device) and the
    final norm and head ``unembed`` (default the last block's). Keys are full leaf names."""
    family = family_for(cfg)
    names = {id(value): name for name, value in params.items()}

    def leaf_names(weights):
        return [names[id(leaf)] for leaf in optree.tree_leaves(weights, none_is_leaf=False) if isinstance(leaf, Tensor) and id(leaf) in names]

    devices = [_device(d) for d in devices]
    per_layer = [devices[layer * len(devices) // cfg.n_layers] for layer in range(cfg.n_layers)]
    embed_names, unembed_names = leaf_names(family.embed_weights(params, cfg)), leaf_names(family.unembed_weights(params, cfg))
    embed = _device(embed if embed is not None else per_layer[0])
    tied = set(embed_names) & set(unembed_names)  # a tied head sits with the embedding
    unembed = _device(unembed if unembed is not None else embed if tied else per_layer[-1])
    if tied and unembed != embed:
        raise ValueError(f"the head is tied to the embedding ({sorted(tied)}): both must be on one device, got {embed} and {unembed}")
    device_map = {name: unembed for name in unembed_names}
    device_map.update({name: embed for name in embed_names})
    for layer in range(cfg.n_layers):
        device_map.update({name: per_layer[layer] for name in leaf_names(family.layer_weights(params, cfg, layer))})
    missing = [name for name in params if name not in device_map]
    if missing:
        raise ValueError(f"leaves in no block, embedding or unembedding: {missing[:4]}")
    return device_map
