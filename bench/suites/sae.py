"""SAE: one standard SAE of width 16 x d_model spliced at the middle block's hook_resid_pre.
run_with_cache_with_saes (every hook cached, error term on) vs the HF forward (sdpa), vs the
plain forward, vs the SAE alone on that activation, and with --anchors (and sae-lens installed)
vs SAELens's HookedSAETransformer.run_with_cache_with_saes on the same weights; a 64-feature
ablation sweep as one vmapped call (fb.sae.features.feature_sweep) vs a Python loop of hooked
runs."""

from __future__ import annotations

import torch

import functional_bridge.sae as fbsae
from functional_bridge.sae.features import feature_sweep

from .. import targets
from ..models import random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [f"ours / SAELens run_with_cache_with_saes {targets.SAE_CACHE_CPU.text()}",
           f"loop / feature_sweep, 64 features (speed-up) {targets.SAE_SWEEP_CPU.text()}",
           f"max |vmap - loop| {targets.AGREE_TEXT}"]  # fmt: skip
N_FEATURES = 64


def _sae(cfg, dtype, device) -> fbsae.SAE:
    name = f"blocks.{cfg.n_layers // 2}.hook_resid_pre"
    sae_cfg = fbsae.SAEConfig("standard", d_in=cfg.d_model, d_sae=16 * cfg.d_model, hook_name=name,
                              dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype])  # fmt: skip
    return fbsae.SAE.random(sae_cfg, seed=0, device=device)


def _hooked_sae_transformer(ctx):
    if not ctx.settings.anchors:
        return None

    def build():
        from sae_lens import HookedSAETransformer

        from ..anchors import hooked_transformer

        return hooked_transformer(ctx.models.hf(ctx.dtype), HookedSAETransformer)

    return ctx.attempt("SAELens HookedSAETransformer anchor", build)


def run(ctx) -> None:
    hf, bridge = ctx.models.hf(ctx.dtype), ctx.models.bridge(ctx.dtype)
    cfg = bridge.cfg
    sae = _sae(cfg, ctx.dtype, ctx.device)
    hook = sae.cfg.hook_name
    anchor = _hooked_sae_transformer(ctx)
    lens = fbsae.to_sae_lens(sae) if anchor is not None else None
    ctx.note(f"SAE: standard, d_sae={sae.cfg.d_sae} at {hook}, use_error_term=True, names_filter=None (every hook).")
    for shape in ctx.plan.shapes:
        case = case_name(shape)
        tokens = random_tokens(shape, cfg.d_vocab, ctx.device)
        with torch.inference_mode():
            _, cache = bridge.run_with_cache(tokens, names_filter=hook)
        x = cache[hook]
        contenders = {
            "hf_sdpa": lambda: hf(tokens, use_cache=False).logits,
            "ours": lambda: bridge(tokens),
            "sae_alone": lambda: sae.forward(x),
            "ours_sae_cache": lambda: bridge.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True),
        }
        if anchor is not None:
            contenders["lens_sae_cache"] = lambda: anchor.run_with_cache_with_saes(tokens, saes=[lens], use_error_term=True)
        with torch.inference_mode():
            m = ctx.measure(case, contenders)
        labels = {"ours_sae_cache": "ours run_with_cache_with_saes", "lens_sae_cache": "SAELens run_with_cache_with_saes",
                  "sae_alone": "the SAE alone (encode + decode)"}  # fmt: skip
        for name in contenders:
            ctx.time_row(case, m, name, labels.get(name, name))
        ctx.ratio_row(case, m, "ours_sae_cache", "hf_sdpa", "ours SAE cache / HF sdpa")
        ctx.ratio_row(case, m, "sae_alone", "hf_sdpa", "SAE alone / HF sdpa")
        if anchor is not None:
            ctx.ratio_row(case, m, "lens_sae_cache", "hf_sdpa", "SAELens SAE cache / HF sdpa")
            ctx.ratio_row(case, m, "ours_sae_cache", "lens_sae_cache", "ours / SAELens run_with_cache_with_saes",
                          targets.SAE_CACHE_CPU if not ctx.cuda else None, shape)  # fmt: skip
    _sweep(ctx, bridge, sae)


def _sweep(ctx, bridge, sae) -> None:
    cfg, shape = bridge.cfg, ctx.plan.patching
    case = f"{N_FEATURES} features, {case_name(shape)}"
    tokens = random_tokens(shape, cfg.d_vocab, ctx.device, seed=3)
    features = torch.arange(N_FEATURES, device=ctx.device)
    name = f"{hook}.hook_sae_acts_post" if (hook := sae.cfg.output_hook) else None

    def metric(logits):  # [batch, pos, vocab] -> scalar
        return (logits[:, -1, 1] - logits[:, -1, 2]).float().mean()

    def vmapped():
        return feature_sweep(bridge.params, tokens, cfg, sae, features, metric)

    def loop():
        scores = torch.empty(N_FEATURES)
        with bridge.saes([sae], use_error_term=True):
            for f in range(N_FEATURES):
                def ablate(acts, hook, f=f):
                    acts = acts.clone()
                    acts[..., f] = 0
                    return acts

                scores[f] = metric(bridge.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])).item()
        return scores

    with torch.inference_mode():
        difference = (vmapped().float().cpu() - loop()).abs().max().item()
        ctx.value_row(case, "max |vmap - loop| (metric)", difference, "abs", targets.agreement(ctx.dtype))
        m = ctx.measure(case, {"vmap": vmapped, "loop": loop}, heavy=True)
    ctx.time_row(case, m, "vmap", "feature_sweep (vmap)")
    ctx.time_row(case, m, "loop", "loop of run_with_hooks")
    ctx.ratio_row(case, m, "loop", "vmap", "speed-up: loop / feature_sweep", targets.SAE_SWEEP_CPU if not ctx.cuda else None, shape)
