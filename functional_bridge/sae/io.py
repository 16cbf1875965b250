"""SAELens's saved folder format, offline: ``cfg.json`` (SAEConfig.to_dict) and
``sae_weights.safetensors`` (the params under their state-dict names)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import DTYPES, SAEConfig
from .sae import SAE

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"


def save_sae(sae: SAE, path: str | Path) -> tuple[Path, Path]:
    """Write the folder; returns (weights path, cfg path) as SAELens's save_model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights, cfg = path / WEIGHTS_FILENAME, path / CFG_FILENAME
    save_file({name: value.detach().contiguous().cpu() for name, value in sae.params.items()}, str(weights))
    cfg_dict = sae.cfg.replace(dtype=_dtype_name(sae.dtype)).to_dict()
    cfg.write_text(json.dumps(cfg_dict))
    return weights, cfg


def load_sae(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None) -> SAE:
    """Read a folder written by SAELens (``sae.save_model``) or by save_sae. dtype: the config's
    unless given. Older JumpReLU files storing ``log_threshold`` are converted, as SAELens does."""
    path = Path(path)
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an SAELens SAE folder: {name} is missing")
    cfg = SAEConfig.from_dict(json.loads((path / CFG_FILENAME).read_text()))
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype if isinstance(dtype, str) else _dtype_name(dtype))
    state = load_file(str(path / WEIGHTS_FILENAME), device=str(device))
    if "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
    scaling = state.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise NotImplementedError("a finetuning scaling_factor other than 1 is not supported (SAELens 6 drops it too)")
    return SAE({name: value.to(cfg.torch_dtype) for name, value in state.items()}, cfg)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported SAE dtype {dtype}; supported: {sorted(DTYPES)}")
