"""Patching: a sweep over every head (hook_z of head (l, h) from a corrupted run into the clean
run, metric = logit difference of two tokens at the last position), as one vmapped call
(fb.patching.head_z_patching) vs a Python loop of run_with_hooks. Both include the corrupted
run that provides the activations."""

from __future__ import annotations

import torch

import functional_bridge as fb
from functional_bridge.func import detached

from .. import targets
from ..models import random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [f"loop / head_z_patching (speed-up) {targets.PATCHING_GPU.text()}",
           f"max |vmap - loop| {targets.AGREE_TEXT}"]  # fmt: skip


def run(ctx) -> None:
    bridge = ctx.models.bridge(ctx.dtype)
    cfg, shape = bridge.cfg, ctx.plan.patching
    case = f"{cfg.n_layers * cfg.n_heads} heads, {case_name(shape)}"
    params = detached(bridge.params)
    clean = random_tokens(shape, cfg.d_vocab, ctx.device, seed=3)
    corrupted = random_tokens(shape, cfg.d_vocab, ctx.device, seed=4)

    def metric(logits):  # [batch, pos, vocab] -> scalar
        return (logits[:, -1, 1] - logits[:, -1, 2]).float().mean()

    def vmapped():
        return fb.patching.head_z_patching(params, cfg, clean, corrupted, metric)

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(cfg.n_layers)]

    def loop():
        _, source = fb.run_with_cache(params, corrupted, cfg, names_filter=names)
        scores = torch.empty(cfg.n_layers, cfg.n_heads)
        for layer, name in enumerate(names):
            for head in range(cfg.n_heads):
                def patch(z, hook, head=head):  # z: [batch, pos, head, d_head]
                    z = z.clone()
                    z[:, :, head] = source[hook.name][:, :, head]
                    return z

                scores[layer, head] = metric(fb.run_with_hooks(params, clean, cfg, fwd_hooks=[(name, patch)])).item()
        return scores

    with torch.inference_mode():
        difference = (vmapped().float().cpu() - loop()).abs().max().item()
        agree = targets.agreement(ctx.dtype)
        ctx.value_row(case, "max |vmap - loop| (metric)", difference, "abs", agree)
        m = ctx.measure(case, {"vmap": vmapped, "loop": loop}, heavy=True)
    ctx.time_row(case, m, "vmap", "head_z_patching (vmap)")
    ctx.time_row(case, m, "loop", "loop of run_with_hooks")
    ctx.ratio_row(case, m, "loop", "vmap", "speed-up: loop / head_z_patching", targets.PATCHING_GPU if ctx.cuda else None, shape)
    ctx.note("The loop reads each world's metric with .item() (a host copy per world, as a user's loop would).")
