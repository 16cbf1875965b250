"""SAE: an SAE or transcoder as data (a params pytree and an SAEConfig) with SAELens's methods
(encode, decode, forward, W_enc...), and the conversions to and from a ``sae_lens.SAE``.

The object holds no hook points and no flags: splicing it into a model (add_sae) is a hook the
Bridge builds per call (splice.py). Its methods delegate to the pure functions in codec.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import codec as pure
from .config import DTYPES as _DTYPE_NAMES
from .config import SAEConfig
from .params import SAEParams, check_sae_params, init_sae_params, leaf_shapes


class SAE:
    """params: SAELens's state-dict names -> tensors (params.py); cfg: SAEConfig."""

    def __init__(self, params: SAEParams, cfg: SAEConfig):
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"cfg must be an SAEConfig, got {type(cfg).__name__}")
        check_sae_params(params, cfg)
        self.params = dict(params)
        self.cfg = cfg
        self.d_head: int | None = None  # a hook_z SAE's head size, remembered by encode as SAELens does

    @classmethod
    def random(cls, cfg: SAEConfig, seed: int = 0, scale: float = 1.0, device=None) -> "SAE":
        return cls(init_sae_params(cfg, seed, scale, device), cfg)

    def __getattr__(self, name: str) -> Tensor:
        params = self.__dict__.get("params", {})
        if name in params:
            return params[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def dtype(self) -> torch.dtype:
        return self.params["W_enc"].dtype

    @property
    def device(self) -> torch.device:
        return self.params["W_enc"].device

    def to(self, *args, **kwargs) -> "SAE":
        """A new SAE with every leaf moved (Tensor.to's arguments); the config's dtype follows."""
        params = {name: value.to(*args, **kwargs) for name, value in self.params.items()}
        dtype = next(name for name, d in _DTYPE_NAMES.items() if d == params["W_enc"].dtype)
        return SAE(params, self.cfg.replace(dtype=dtype))

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] (hook_z: [..., n_heads, d_head]) -> feature activations [..., d_sae]."""
        if self.cfg.reshape_activations == "hook_z":
            self.d_head = x.shape[-1]
        return pure.encode(self.params, x, self.cfg)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_out] (hook_z: heads restored with the d_head encode saw)."""
        return pure.decode(self.params, feature_acts, self.cfg, d_head=self.d_head)

    def forward(self, x: Tensor) -> Tensor:
        """decode(encode(x)), with a skip transcoder's skip path."""
        return pure.forward(self.params, x, self.cfg)

    __call__ = forward

    def __repr__(self):
        c = self.cfg
        where = c.hook_name if not c.is_transcoder else f"{c.hook_name} -> {c.output_hook}"
        return f"SAE({c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}, {where})"


def as_sae(sae) -> SAE:
    """An SAE, from an SAE or a ``sae_lens.SAE``."""
    if isinstance(sae, SAE):
        return sae
    if type(sae).__module__.startswith("sae_lens"):
        return from_sae_lens(sae)
    raise TypeError(f"expected a functional_bridge SAE or a sae_lens SAE, got {type(sae).__name__}")


def from_sae_lens(sae) -> SAE:
    """The same SAE as data: its config from SAELens's cfg.to_dict(), its tensors shared (detached
    views of its parameters, so later edits to either are seen by both)."""
    cfg = SAEConfig.from_dict(sae.cfg.to_dict())
    state = sae.state_dict()
    expected = leaf_shapes(cfg)
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ValueError(f"sae_lens {type(sae).__name__} has parameters this {cfg.architecture} SAE does not know: {extra}")
    return SAE({name: state[name].detach() for name in expected}, cfg)


def to_sae_lens(sae: SAE):
    """A ``sae_lens.SAE`` of the same architecture holding copies of these tensors (needs sae-lens)."""
    from sae_lens import SAE as LensSAE

    lens = LensSAE.from_dict(sae.cfg.to_dict())
    lens.load_state_dict({name: value.detach().clone() for name, value in sae.params.items()})
    return lens.to(device=sae.device)
