"""Forward: ours (bridge(tokens), no hooks) vs HF's default attention (sdpa) and HF eager,
under torch.inference_mode; HookedTransformer too with --anchors."""

from __future__ import annotations

import torch

from .. import targets
from ..models import random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [
    f"ours / HF sdpa {targets.FORWARD_CPU.text()}",
    f"ours / HF sdpa {targets.FORWARD_GPU.text()}",
]


def run(ctx) -> None:
    hf, eager, bridge = ctx.models.hf(ctx.dtype), ctx.models.hf_eager(ctx.dtype), ctx.models.bridge(ctx.dtype)
    anchor = ctx.anchor()
    ctx.note("HF is called with use_cache=False (no KV cache object); every contender returns logits for every position.")
    for shape in ctx.plan.shapes:
        case = case_name(shape)
        tokens = random_tokens(shape, bridge.cfg.d_vocab, ctx.device)
        contenders = {
            "ours": lambda: bridge(tokens),
            "hf_sdpa": lambda: hf(tokens, use_cache=False).logits,
            "hf_eager": lambda: eager(tokens, use_cache=False).logits,
        }
        if anchor is not None:
            contenders["tl"] = lambda: anchor(tokens)
        with torch.inference_mode():
            m = ctx.measure(case, contenders)
        for name in contenders:
            ctx.time_row(case, m, name)
        target = targets.FORWARD_GPU if ctx.cuda else targets.FORWARD_CPU
        ctx.ratio_row(case, m, "ours", "hf_sdpa", "ours / HF sdpa", target, shape)
        ctx.ratio_row(case, m, "ours", "hf_eager", "ours / HF eager")
        if anchor is not None:
            ctx.ratio_row(case, m, "tl", "hf_sdpa", "HookedTransformer / HF sdpa")
            ctx.ratio_row(case, m, "ours", "tl", "ours / HookedTransformer")

