"""Where an analysis reads its weights: a live Bridge, or a fixed params pytree.

An analysis object (ActivationCache, SVDInterpreter) holds a *model*: anything with ``.params``
(HF name -> leaf) and ``.cfg``. A Bridge is one, and reading ``bridge.params`` at call time means
the TL weights an analysis uses are derived from the leaves as they are now, never a snapshot.
FixedParams wraps a params pytree and its config for the pure API. Both compare by identity, so
they can sit in a pytree's static metadata.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from ..config import BridgeConfig
from ..params import Params
from ..weights import tl_weights


class FixedParams:
    """A params pytree and its config, standing in for a Bridge where an analysis wants a model."""

    __slots__ = ("params", "cfg")

    def __init__(self, params: Params, cfg: BridgeConfig):
        self.params = params
        self.cfg = cfg

    def tl_parameters(self) -> dict[str, Tensor]:
        return tl_weights(self.params, self.cfg)

    def __repr__(self) -> str:
        return f"FixedParams({self.cfg.original_architecture}, {len(self.params)} leaves)"


def as_model(model_or_params, cfg: BridgeConfig | None = None):
    """A Bridge (or any object with .params and .cfg) as is; a params mapping plus cfg wrapped."""
    if isinstance(model_or_params, Mapping):
        if cfg is None:
            raise TypeError("a params mapping needs its cfg: pass cfg=...")
        return FixedParams(model_or_params, cfg)
    if not (hasattr(model_or_params, "params") and hasattr(model_or_params, "cfg")):
        raise TypeError(
            f"expected a Bridge, an object with .params and .cfg, or a params mapping with cfg; "
            f"got {type(model_or_params).__name__}"
        )
    return model_or_params


def current_tl_weights(model) -> dict[str, Tensor]:
    """TL name -> tensor, derived from the model's leaves now."""
    return tl_weights(model.params, model.cfg)
