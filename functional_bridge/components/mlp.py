"""MLPs (plain and gated) and the activation functions HF configs name."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..hooks import HookSet, LayerHookNames
from .linear import Affine, affine


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


# HF's names -> one-kernel equivalents. gelu_new, gelu_fast and gelu_pytorch_tanh are the same
# tanh approximation of GELU (HF's gelu_new is eight ops in Python; F.gelu is one kernel).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "quick_gelu": _quick_gelu,
}


class MLPWeights(NamedTuple):
    w_in: Affine | None  # d_model -> d_mlp (the "up"/linear branch of a gated MLP)
    w_gate: Affine | None  # d_model -> d_mlp, through the activation; None for a plain MLP
    w_out: Affine  # d_mlp -> d_model
    gate_up: Affine | None = None  # fused d_model -> [gate | up] (Phi-3), instead of w_gate and w_in


def mlp(x: Tensor, weights: MLPWeights, act_fn: str, hooks: HookSet, names: LayerHookNames) -> Tensor:
    """x: [batch, pos, d_model] -> [batch, pos, d_model]. Hooks as HookedTransformer: a plain
    MLP's hook_pre is x @ W_in + b_in; a gated MLP's hook_pre is the gate pre-activation and
    hook_pre_linear the linear branch."""
    act = ACTIVATIONS[act_fn]
    if weights.gate_up is not None:
        gate, up = affine(x, weights.gate_up).chunk(2, dim=-1)  # [batch, pos, d_mlp] each
        post = hooks(names.mlp_post, act(hooks(names.mlp_pre, gate)) * hooks(names.mlp_pre_linear, up))
    elif weights.w_gate is None:
        pre = hooks(names.mlp_pre, affine(x, weights.w_in))  # [batch, pos, d_mlp]
        post = hooks(names.mlp_post, act(pre))
    else:
        pre = hooks(names.mlp_pre, affine(x, weights.w_gate))
        pre_linear = hooks(names.mlp_pre_linear, affine(x, weights.w_in))
        post = hooks(names.mlp_post, act(pre) * pre_linear)
    return affine(post, weights.w_out)
