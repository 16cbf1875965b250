"""Pure encode / decode of every supported SAE and transcoder: tensors in, tensors out, no state,
so they compose with vmap, grad and compile. SAELens 6.54's arithmetic, operation for operation
(so results agree to the last bit where the kernels do).

``hook(name, x) -> x`` is called at SAELens's hook points of an SAE, by their short names:
``hook_sae_input`` (the input after the dtype cast and the head flattening, before b_dec is
subtracted), ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons`` (the flat
reconstruction). Shapes: x [..., d_in] (hook_z SAEs: [..., n_heads, d_head]), acts [..., d_sae].
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .config import SAEConfig
from .params import SAEParams

SAEHook = Callable[[str, Tensor], Tensor]


def no_hook(name: str, x: Tensor) -> Tensor:
    return x


def sae_input(params: SAEParams, x: Tensor, cfg: SAEConfig, hook: SAEHook = no_hook) -> Tensor:
    """SAELens's process_sae_in: cast to the SAE's dtype, flatten heads (hook_z), hook_sae_input,
    subtract b_dec (apply_b_dec_to_input; never for transcoders)."""
    x = x.to(params["W_enc"].dtype)
    if cfg.reshape_activations == "hook_z":
        x = x.flatten(-2)  # [..., n_heads, d_head] -> [..., n_heads * d_head]
    x = hook("hook_sae_input", x)
    if cfg.apply_b_dec_to_input:
        x = x - params["b_dec"]
    return x


def topk_relu(pre: Tensor, k: int) -> Tensor:
    """The k largest entries of the last axis, through ReLU; zeros elsewhere."""
    values, indices = torch.topk(pre, k=k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def encode(params: SAEParams, x: Tensor, cfg: SAEConfig, hook: SAEHook = no_hook) -> Tensor:
    """Feature activations [..., d_sae]."""
    sae_in = sae_input(params, x, cfg, hook)  # [..., d_in]
    W_enc, arch = params["W_enc"], cfg.architecture
    if arch == "gated":
        active = (sae_in @ W_enc + params["b_gate"] > 0).to(W_enc.dtype)
        pre = hook("hook_sae_acts_pre", sae_in @ (W_enc * params["r_mag"].exp()) + params["b_mag"])
        return hook("hook_sae_acts_post", active * pre.relu())
    pre = hook("hook_sae_acts_pre", sae_in @ W_enc + params["b_enc"])  # [..., d_sae]
    if arch == "topk":
        if cfg.rescale_acts_by_decoder_norm:  # the k are chosen on decoder-norm-scaled values
            pre = pre * params["W_dec"].norm(dim=-1)
        acts = topk_relu(pre, cfg.k)
    elif "jumprelu" in arch:
        acts = pre.relu() * (pre > params["threshold"]).to(pre.dtype)
    else:
        acts = pre.relu()
    return hook("hook_sae_acts_post", acts)


def decode(params: SAEParams, acts: Tensor, cfg: SAEConfig, hook: SAEHook = no_hook, d_head: int | None = None) -> Tensor:
    """The reconstruction [..., d_out] (hook_z SAEs: [..., n_heads, d_head], which needs d_head).
    A skip transcoder's W_skip term needs the input: see ``forward``."""
    W_dec = params["W_dec"]
    if cfg.architecture == "topk" and cfg.rescale_acts_by_decoder_norm:
        acts = acts * (1 / W_dec.norm(dim=-1))
    out = hook("hook_sae_recons", acts @ W_dec + params["b_dec"])  # [..., d_out]
    if cfg.reshape_activations == "hook_z":
        if d_head is None:
            raise ValueError("decoding a hook_z SAE gives [..., n_heads, d_head]: pass d_head")
        out = out.unflatten(-1, (-1, d_head))
    return out


def skip_term(params: SAEParams, x: Tensor) -> Tensor:
    """A skip transcoder's x @ W_skip.T [..., d_out] (x as given, before any cast)."""
    return x @ params["W_skip"].T


def forward(params: SAEParams, x: Tensor, cfg: SAEConfig, hook: SAEHook = no_hook) -> Tensor:
    """decode(encode(x)), plus the skip path of a skip transcoder (as SAELens's
    SkipTranscoder.forward). hook_z SAEs take d_head from x."""
    d_head = x.shape[-1] if cfg.reshape_activations == "hook_z" else None
    out = decode(params, encode(params, x, cfg, hook), cfg, hook, d_head)
    return out + skip_term(params, x) if cfg.has_skip else out
