"""Per-example gradients with padding (left-padded rows of different lengths):
fb.per_example_grads (vmap of grad) vs a Python loop of single-example gradients (autograd,
each padded row with its mask), and vs HF + torch.func.functional_call + vmap where that runs
(its failure message is recorded when it does not). A loop over the rows trimmed to their real
tokens is timed too, as the strictest loop."""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

import functional_bridge as fb
from functional_bridge.func import detached

from .. import targets
from ..models import left_padded_mask, random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [
    f"loop / per_example_grads (speed-up) {targets.GRADS_CPU.text()}",
    f"loop / per_example_grads (speed-up) {targets.GRADS_GPU.text()}",
    f"max |vmap - loop| / max |loop| {targets.AGREE_TEXT}",
]


def run(ctx) -> None:
    hf, bridge = ctx.models.hf(ctx.dtype), ctx.models.bridge(ctx.dtype)
    cfg = bridge.cfg
    shape = ctx.plan.grads
    case = case_name(shape)
    tokens = random_tokens(shape, cfg.d_vocab, ctx.device, seed=1)
    mask = left_padded_mask(shape, ctx.device)
    lengths = mask.sum(-1).tolist()
    ctx.note(f"{shape[0]} rows of {shape[1]} positions, real lengths {lengths}, left padded; loss: fb.next_token_loss over real tokens.")
    params = detached(bridge.params)
    leaves = {name: leaf.detach().requires_grad_(True) for name, leaf in bridge.params.items()}

    def ours():
        return fb.per_example_grads(params, cfg, tokens, mask)

    def loop(trim: bool = False):
        grads = []
        for row in range(shape[0]):
            row_tokens, row_mask = tokens[row : row + 1], mask[row : row + 1]
            if trim:
                real = row_mask[0].bool()
                row_tokens, row_mask = row_tokens[:, real], None
            logits = fb.forward(leaves, row_tokens, cfg, attention_mask=row_mask)
            loss = fb.next_token_loss(logits, row_tokens, row_mask)
            grads.append(torch.autograd.grad(loss, list(leaves.values())))
        return grads

    contenders = {"ours": ours, "loop": loop, "loop_trimmed": lambda: loop(trim=True)}
    hf_vmap = ctx.attempt("HF + functional_call + vmap(grad)", lambda: _hf_vmap_grads(hf, tokens, mask))
    if hf_vmap is not None:
        contenders["hf_vmap"] = hf_vmap
    else:
        ctx.value_row(case, "HF + functional_call + vmap(grad)", None, "", note="failed: see notes")

    # agreement first (also a warm-up): the figures below are only timings if the results agree
    reference, theirs = loop(), ours()
    names = list(leaves)
    worst = max(
        ((theirs[name][row] - reference[row][i]).abs().max() / reference[row][i].abs().max().clamp(min=1e-30)).item()
        for row in range(shape[0]) for i, name in enumerate(names)
    )  # fmt: skip
    agree = targets.agreement(ctx.dtype)
    ctx.value_row(case, "max |vmap - loop| / max |loop| (per leaf, per row)", worst, "rel", agree)
    del reference, theirs

    m = ctx.measure(case, contenders, heavy=True)
    labels = {"ours": "fb.per_example_grads", "loop": "loop of autograd.grad (padded rows)",
              "loop_trimmed": "loop (rows trimmed to real tokens)", "hf_vmap": "HF functional_call + vmap(grad)"}  # fmt: skip
    for name in contenders:
        ctx.time_row(case, m, name, labels[name])
    target = targets.GRADS_GPU if ctx.cuda else targets.GRADS_CPU
    ctx.ratio_row(case, m, "loop", "ours", "speed-up: loop / per_example_grads", target, shape)
    ctx.ratio_row(case, m, "loop_trimmed", "ours", "speed-up: trimmed loop / per_example_grads")
    if "hf_vmap" in contenders:
        ctx.ratio_row(case, m, "ours", "hf_vmap", "per_example_grads / HF vmap(grad)")


def _hf_vmap_grads(hf, tokens, mask):
    """vmap(grad) through HF's own forward with torch.func.functional_call; returns the timed
    callable if one call succeeds (it raises otherwise)."""
    params = {name: p.detach() for name, p in hf.named_parameters()}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def loss(p, row, row_mask, row_positions):
        out = functional_call(
            hf, p, (row[None],),
            {"attention_mask": row_mask[None], "position_ids": row_positions[None], "use_cache": False},
        )  # fmt: skip
        return fb.next_token_loss(out.logits, row[None], row_mask[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0, 0))

    def call():
        return per_example(params, tokens, mask, positions)

    call()
    return call
