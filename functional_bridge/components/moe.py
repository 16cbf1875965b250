"""A top-k routed mixture of gated-MLP experts (Mixtral), computed densely.

Every expert runs on every token and the router's weights (zero for the experts a token was not
routed to) mix their outputs: no data-dependent shapes or Python branches, so the forward stays
vmap-able and compilable. It costs num_experts / experts_per_token times the routed FLOPs:
measured on CPU (8 experts, top-2, d_model 256, d_mlp 512, 2 layers, 4 x 64 tokens, one process,
interleaved) the whole forward takes 2.5-2.7x HF's, whose experts gather their tokens (eager loop
or grouped_mm). A gathered path (data-dependent shapes) would not vmap; it is not implemented.

Routing is HF's MixtralTopKRouter: softmax of the router logits in float32, top-k, the chosen
weights renormalised to sum to 1. Hooks are TransformerLens's MoE names:
``mlp.hook_expert_weights`` (the float32 softmax over all experts, [batch * pos, experts]),
``mlp.hook_expert_indices`` ([batch * pos, k], editable: the routing follows the edit) and, per
expert, ``mlp.experts.{e}.hook_gate`` (gate pre-activation), ``hook_pre`` (the linear branch) and
``hook_post``, each [batch * pos, d_mlp]. TransformerLens's per-expert hooks see only the tokens
routed to the expert (a data-dependent shape); these see every token, and rows of tokens not routed
to an expert do not reach the output.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..hooks import HookSet, LayerHookNames
from .linear import Affine, affine
from .precision import upcast


class MoEWeights(NamedTuple):
    router: Affine  # d_model -> num_experts
    gate_up: Tensor  # [experts, 2 * d_mlp, d_model]: each expert's gate rows, then its up rows
    down: Tensor  # [experts, d_model, d_mlp]
    top_k: int


def routing_weights(probs: Tensor, indices: Tensor) -> Tensor:
    """probs [tokens, experts] (float32), indices [tokens, k] -> [tokens, experts]: the chosen
    experts' probabilities renormalised to sum to 1, zero elsewhere."""
    top = probs.gather(-1, indices)
    top = top / top.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, indices, top)


def moe(x: Tensor, weights: MoEWeights, act, hooks: HookSet, names: LayerHookNames) -> Tensor:
    """x: [batch, pos, d_model] -> [batch, pos, d_model]."""
    flat = x.reshape(-1, x.shape[-1])  # [tokens, d_model]
    probs = hooks(names.expert_weights, upcast(affine(flat, weights.router)).softmax(-1))  # [tokens, experts]
    indices = hooks(names.expert_indices, probs.topk(weights.top_k, dim=-1).indices)  # [tokens, k]
    routing = routing_weights(probs, indices)
    gate_up = torch.matmul(flat, weights.gate_up.transpose(-1, -2))  # [experts, tokens, 2 * d_mlp]
    gate, up = gate_up.chunk(2, dim=-1)
    if any(hooks.wants(name) for name in names.experts):
        post = torch.stack([_hooked_expert(g, u, act, hooks, names.experts[3 * e : 3 * e + 3]) for e, (g, u) in enumerate(zip(gate, up))])
    else:
        post = act(gate) * up  # [experts, tokens, d_mlp]
    out = torch.matmul(post, weights.down.transpose(-1, -2))  # [experts, tokens, d_model]
    mixed = (out * routing.T[..., None]).to(x.dtype).sum(0)  # HF: weight in float32, cast, then add
    return mixed.view(x.shape)


def _hooked_expert(gate: Tensor, up: Tensor, act, hooks: HookSet, names: tuple[str, ...]) -> Tensor:
    gate_name, pre_name, post_name = names
    gate, up = hooks(gate_name, gate), hooks(pre_name, up)
    return hooks(post_name, act(gate) * up)
