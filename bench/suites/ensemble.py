"""Ensemble: K=8 members as one stacked pytree (fb.stack_params), run with
vmap(fb.forward) in one call, vs a Python loop of K forwards (fb.unstack_params views), under
torch.inference_mode."""

from __future__ import annotations

import torch
from torch.func import vmap

import functional_bridge as fb
from functional_bridge.func import detached

from .. import targets
from ..models import random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = ["none set: the speed-up loop / vmap is reported",
           f"max |vmap - loop| {targets.AGREE_TEXT}"]  # fmt: skip


def run(ctx) -> None:
    bridge = ctx.models.bridge(ctx.dtype)
    cfg, k, shape = bridge.cfg, ctx.plan.ensemble_k, ctx.plan.ensemble
    case = f"K={k}, {case_name(shape)}"
    params = detached(bridge.params)
    with torch.no_grad():
        stacked = fb.stack_params([params] * k)
        for member in range(k):  # make the members differ
            for leaf in stacked.values():
                leaf[member].mul_(1 + 0.01 * member)
    members = fb.unstack_params(stacked)
    tokens = random_tokens(shape, cfg.d_vocab, ctx.device, seed=2)
    ensemble = vmap(fb.forward, in_dims=(0, None, None))

    contenders = {
        "vmap": lambda: ensemble(stacked, tokens, cfg),
        "loop": lambda: [fb.forward(member, tokens, cfg) for member in members],
    }
    with torch.inference_mode():
        together = contenders["vmap"]()
        one_by_one = torch.stack(contenders["loop"]())
        agree = targets.agreement(ctx.dtype)
        ctx.value_row(case, "max |vmap - loop| (logits)", (together - one_by_one).abs().max().item(), "abs", agree)
        del together, one_by_one
        m = ctx.measure(case, contenders, heavy=True)
    ctx.time_row(case, m, "vmap", "vmap(fb.forward) over stack_params")
    ctx.time_row(case, m, "loop", f"loop of {k} forwards")
    ctx.ratio_row(case, m, "loop", "vmap", "speed-up: loop / vmap")
    ctx.note("Inside vmap attention takes the explicit path (CPU SDPA has no batching rule); the loop uses SDPA.")
