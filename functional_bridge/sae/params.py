"""An SAE's params pytree: a dict of tensors under SAELens's state-dict names (W_enc, b_enc,
W_dec, b_dec, threshold, b_gate, b_mag, r_mag, W_skip), their shapes per architecture, a
structure check with clear errors, and a random init for tests and training.

A stack of SAEs of one config is the same dict with a leading [n_saes] axis on every leaf
(``stack``), which is what vmap takes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SAEConfig

SAEParams = dict[str, Tensor]


def leaf_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Leaf name -> shape, in SAELens's state-dict order."""
    d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.output_dim
    arch = cfg.architecture
    shapes: dict[str, tuple[int, ...]] = {"W_enc": (d_in, d_sae)}
    if arch == "gated":
        shapes.update(b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    else:
        shapes["b_enc"] = (d_sae,)
    if "jumprelu" in arch:
        shapes["threshold"] = (d_sae,)
    shapes.update(W_dec=(d_sae, d_out), b_dec=(d_out,))
    if cfg.has_skip:
        shapes["W_skip"] = (d_out, d_in)
    return shapes


def check_sae_params(params: SAEParams, cfg: SAEConfig, batch_dims: int = 0) -> None:
    """Raise ValueError naming missing, extra or misshapen leaves (``batch_dims`` leading axes,
    e.g. 1 for a stack, are allowed and must agree)."""
    expected = leaf_shapes(cfg)
    missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"{cfg.architecture} SAE params: missing {missing}, unexpected {extra}")
    leading = {tuple(params[name].shape[:batch_dims]) for name in expected}
    if len(leading) != 1:
        raise ValueError(f"SAE params: leaves disagree on their {batch_dims} leading axes: {sorted(leading)}")
    for name, shape in expected.items():
        got = tuple(params[name].shape[batch_dims:])
        if got != shape:
            raise ValueError(f"SAE param {name}: expected shape {shape}, got {got} ({cfg.architecture}, d_in={cfg.d_in}, d_sae={cfg.d_sae})")


def init_sae_params(cfg: SAEConfig, seed: int = 0, scale: float = 1.0, device=None) -> SAEParams:
    """Random params with every leaf non-trivial (biases, thresholds and W_skip included), so a
    wrong convention shows: W_dec rows of unequal norms, thresholds that cut some activations."""
    gen = torch.Generator().manual_seed(seed)
    dtype = cfg.torch_dtype

    def randn(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.output_dim
    params = {}
    for name, shape in leaf_shapes(cfg).items():
        if name == "W_enc":
            params[name] = randn(*shape, std=scale / d_in**0.5)
        elif name == "W_dec":
            norms = 0.5 + torch.rand(d_sae, 1, generator=gen, dtype=torch.float64)
            params[name] = (randn(*shape, std=1 / d_out**0.5).double() * norms).to(dtype)
        elif name == "W_skip":
            params[name] = randn(*shape, std=0.3 / d_in**0.5)
        elif name == "threshold":
            params[name] = (0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)
        elif name == "r_mag":
            params[name] = randn(*shape, std=0.2)
        else:  # biases
            params[name] = randn(*shape, std=0.1)
    return {name: value.to(device) for name, value in params.items()} if device is not None else params


def stack(params: list[SAEParams]) -> SAEParams:
    """SAEs of one config as one pytree with a leading [n_saes] axis (for vmap)."""
    if not params:
        raise ValueError("stack needs at least one SAE")
    names = list(params[0])
    for p in params[1:]:
        if list(p) != names:
            raise ValueError(f"stack: SAEs with different leaves: {names} and {list(p)}")
    return {name: torch.stack([p[name] for p in params]) for name in names}
