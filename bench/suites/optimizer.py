"""Optimizer: one AdamW step (zero_grad, forward, next-token loss, backward, step) through the
bridge vs on the HF model (sdpa, eval mode: no dropout, as the bridge). Both optimise the same
tensors (the bridge adopts HF's), each with its own AdamW state; the loss function is the same."""

from __future__ import annotations

import torch

import functional_bridge as fb

from .. import targets
from ..models import random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [f"ours / HF {targets.OPTIMIZER.text()}"]


def run(ctx) -> None:
    hf, bridge = ctx.models.hf(ctx.dtype), ctx.models.bridge(ctx.dtype)
    shape = ctx.plan.optimizer
    case = case_name(shape)
    tokens = random_tokens(shape, bridge.cfg.d_vocab, ctx.device, seed=5)
    saved = [p.detach().clone() for p in hf.parameters()]  # the bridge shares these tensors
    try:
        _measure(ctx, hf, bridge, tokens, case, shape)
    finally:  # later suites measure the model they were given, not one these steps trained
        with torch.no_grad():
            for p, value in zip(hf.parameters(), saved):
                p.grad = None
                p.copy_(value)


def _measure(ctx, hf, bridge, tokens, case, shape) -> None:
    ours_opt = torch.optim.AdamW(bridge.parameters(), lr=1e-5)
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

    def ours():
        ours_opt.zero_grad(set_to_none=True)
        fb.next_token_loss(bridge(tokens), tokens).backward()
        ours_opt.step()

    def theirs():
        hf_opt.zero_grad(set_to_none=True)
        fb.next_token_loss(hf(tokens, use_cache=False).logits, tokens).backward()
        hf_opt.step()

    m = ctx.measure(case, {"ours": ours, "hf": theirs})
    ctx.time_row(case, m, "ours", "ours AdamW step")
    ctx.time_row(case, m, "hf", "HF AdamW step")
    ctx.ratio_row(case, m, "ours", "hf", "ours / HF", targets.OPTIMIZER, shape)
    ctx.note("torch.optim.AdamW with torch's defaults and lr=1e-5; both step the same weights, restored afterwards.")
