"""Cache: run_with_cache with every hook, and with a names_filter of one hook, vs the HF
forward (sdpa) and HF eager (which computes the attention patterns too); a hook that edits
one activation (ablating one head's z) vs the plain forward. Under torch.inference_mode.
HookedTransformer's run_with_cache too with --anchors."""

from __future__ import annotations

import torch

from .. import targets
from ..models import random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [
    f"run_with_cache (every hook) / HF sdpa forward {targets.CACHE_CPU.text()}",
    f"run_with_cache (every hook) / HF eager forward {targets.CACHE_GPU.text()}",
]


def run(ctx) -> None:
    hf, eager, bridge = ctx.models.hf(ctx.dtype), ctx.models.hf_eager(ctx.dtype), ctx.models.bridge(ctx.dtype)
    anchor = ctx.anchor()
    cfg = bridge.cfg
    middle = cfg.n_layers // 2
    one_hook = f"blocks.{middle}.hook_resid_post"
    edited = f"blocks.{middle}.attn.hook_z"

    def ablate_head_0(z, hook):  # z: [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, 0] = 0
        return z

    ctx.note(f"one hook: names_filter={one_hook!r}; edit: head 0 of {edited} set to zero (TransformerLens-style hook).")
    ctx.note("HF eager + outputs: output_attentions=True and output_hidden_states=True, HF's nearest thing to a cache.")
    for shape in ctx.plan.shapes:
        case = case_name(shape)
        tokens = random_tokens(shape, cfg.d_vocab, ctx.device)
        contenders = {
            "hf_sdpa": lambda: hf(tokens, use_cache=False).logits,
            "hf_eager": lambda: eager(tokens, use_cache=False).logits,
            "hf_eager_outputs": lambda: eager(tokens, use_cache=False, output_attentions=True, output_hidden_states=True),
            "ours": lambda: bridge(tokens),
            "ours_cache_all": lambda: bridge.run_with_cache(tokens),
            "ours_cache_one": lambda: bridge.run_with_cache(tokens, names_filter=one_hook),
            "ours_edit": lambda: bridge.run_with_hooks(tokens, fwd_hooks=[(edited, ablate_head_0)]),
        }
        if anchor is not None:
            contenders["tl_cache_all"] = lambda: anchor.run_with_cache(tokens)
        with torch.inference_mode():
            m = ctx.measure(case, contenders)
        labels = {"ours_cache_all": f"ours run_with_cache ({len(bridge.hook_names())} hooks)", "ours_cache_one": "ours run_with_cache (1 hook)",
                  "ours_edit": "ours run_with_hooks (1 edit)", "tl_cache_all": "HookedTransformer run_with_cache",
                  "hf_eager_outputs": "HF eager + outputs"}  # fmt: skip
        for name in contenders:
            ctx.time_row(case, m, name, labels.get(name, name))
        ctx.ratio_row(case, m, "ours_cache_all", "hf_sdpa", "cache (every hook) / HF sdpa", targets.CACHE_CPU if not ctx.cuda else None, shape)
        ctx.ratio_row(case, m, "ours_cache_all", "hf_eager", "cache (every hook) / HF eager", targets.CACHE_GPU if ctx.cuda else None, shape)
        ctx.ratio_row(case, m, "ours_cache_all", "hf_eager_outputs", "cache (every hook) / HF eager + outputs")
        ctx.ratio_row(case, m, "ours_cache_one", "hf_sdpa", "cache (1 hook) / HF sdpa")
        ctx.ratio_row(case, m, "ours_cache_one", "ours", "cache (1 hook) / ours forward")
        ctx.ratio_row(case, m, "ours_edit", "ours", "1 edit hook / ours forward")
        if anchor is not None:
            ctx.ratio_row(case, m, "tl_cache_all", "hf_sdpa", "HookedTransformer cache / HF sdpa")
            ctx.ratio_row(case, m, "ours_cache_all", "tl_cache_all", "ours cache / HookedTransformer cache")
