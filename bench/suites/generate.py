"""Generate: greedy decoding with our functional KV cache (Bridge.generate) vs HF's generate with
its default cache, same model and prompts, interleaved in one process, batch 1 and 8, prompt 32,
64 new tokens (fewer where the context is shorter), on the size's GPT-2 and on a Llama of the same
width and depth (grouped-query heads, rotary, SwiGLU: bench/models.py); and ours with a steering
hook active on every step (a zero vector added at the middle block's resid_post). Tokens/s of
ours in a row too."""

from __future__ import annotations

import torch

from .. import targets
from ..models import random_tokens

DESCRIPTION = __doc__
TARGETS = [
    f"generate / HF generate {targets.GENERATE_CPU.text()}",
    f"generate with a hook / HF generate {targets.GENERATE_HOOK_CPU.text()}",
]
PROMPT, NEW = 32, 64


def run(ctx) -> None:
    ctx.note(f"prompt {PROMPT} tokens, {NEW} new tokens, greedy, no EOS stop; HF: generate(do_sample=False) with its default cache.")
    gpt2 = (ctx.models.hf(ctx.dtype), ctx.models.bridge(ctx.dtype))
    _run_model(ctx, "gpt2", *gpt2)
    _run_model(ctx, "llama", *ctx.models.llama(ctx.dtype))


def _run_model(ctx, model: str, hf, bridge) -> None:
    cfg = bridge.cfg
    prompt = min(PROMPT, cfg.n_ctx // 2)
    new = min(NEW, cfg.n_ctx - prompt)
    hf.generation_config.pad_token_id = 0
    steer = torch.zeros(cfg.d_model, device=ctx.device, dtype=bridge.params[next(iter(bridge.params))].dtype)
    hook = [(f"blocks.{cfg.n_layers // 2}.hook_resid_post", lambda resid, hook: resid + steer)]
    for batch in (1, 8):
        case = f"{model} {batch}x{prompt}+{new}"
        tokens = random_tokens((batch, prompt), cfg.d_vocab, ctx.device)
        mask = torch.ones_like(tokens)
        kwargs = dict(max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False)
        contenders = {
            "hf": lambda: hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new),
            "ours": lambda: bridge.generate(tokens, **kwargs),
            "ours_hook": lambda: bridge.generate(tokens, fwd_hooks=hook, **kwargs),
        }
        with torch.inference_mode():
            same = torch.equal(contenders["ours"](), contenders["hf"]())
            m = ctx.measure(case, contenders, heavy=True)
        ctx.note(f"{case}: ours' tokens {'equal' if same else 'DIFFER FROM'} HF's")
        labels = {"hf": "HF generate", "ours": "ours generate", "ours_hook": "ours generate (1 hook)"}
        for name in contenders:
            ctx.time_row(case, m, name, labels[name])
        ours_s = m.stats("ours").median
        ctx.value_row(case, "ours tokens/s", batch * new / ours_s if ours_s else None, "tok/s")
        small = None  # the targets apply to the small CPU fp32 size (shape None: judged there)
        ctx.ratio_row(case, m, "ours", "hf", "generate / HF generate", targets.GENERATE_CPU, small)
        ctx.ratio_row(case, m, "ours_hook", "hf", "generate with a hook / HF generate", targets.GENERATE_HOOK_CPU, small)
