"""Compile: torch.compile(fb.forward) (static shapes, one graph per shape) vs the eager
fb.forward after warm-up, under torch.inference_mode; the compile time (first call, tracing and
code generation included) is reported. Achieved TFLOP/s come from the shape's matmul FLOPs
(models.flops_per_forward); on CUDA, also the % of the card's dense bf16 peak."""

from __future__ import annotations

import torch

import functional_bridge as fb
from functional_bridge.func import detached

from .. import targets
from ..models import flops_per_forward, random_tokens
from ..runner import case_name
from ..timing import time_once

DESCRIPTION = __doc__
TARGETS = [f"compiled forward, % of the card's dense bf16 peak {targets.COMPILE_PEAK_GPU.text()}"]

# dense (not sparse) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name()
BF16_PEAKS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("4090", 165e12),
]  # fmt: skip


def bf16_peak(device_name: str) -> float | None:
    for key, peak in BF16_PEAKS:
        if key in device_name:
            return peak
    return None


def run(ctx) -> None:
    bridge, hf = ctx.models.bridge(ctx.dtype), ctx.models.hf(ctx.dtype)
    cfg = bridge.cfg
    params = detached(bridge.params)
    shapes = ctx.plan.shapes if ctx.cuda or ctx.settings.size == "tiny" else ctx.plan.shapes[-1:]
    peak = bf16_peak(torch.cuda.get_device_name()) if ctx.cuda else None
    if ctx.cuda:
        ctx.note(f"device {torch.cuda.get_device_name()}; dense bf16 peak used: {peak and peak / 1e12} TFLOP/s")
    ctx.note(f"mode={ctx.settings.compile_mode!r}, dynamic=False, fullgraph=True")
    for shape in shapes:
        case = case_name(shape)
        tokens = random_tokens(shape, cfg.d_vocab, ctx.device)
        torch._dynamo.reset()
        compiled = torch.compile(fb.forward, fullgraph=True, dynamic=False, mode=ctx.settings.compile_mode)
        with torch.inference_mode():
            seconds, out = time_once(lambda: compiled(params, tokens, cfg), ctx.clock)
            eager = fb.forward(params, tokens, cfg)
            difference = (out.float() - eager.float()).abs().max().item()
            ctx.value_row(case, "compile time (first call)", seconds, "s")
            agree = targets.agreement(ctx.dtype)
            ctx.value_row(case, "max |compiled - eager| (logits)", difference, "abs", agree)
            m = ctx.measure(case, {
                "compiled": lambda: compiled(params, tokens, cfg),
                "eager": lambda: fb.forward(params, tokens, cfg),
                "hf_sdpa": lambda: hf(tokens, use_cache=False).logits,
            })  # fmt: skip
        for name, label in (("compiled", "compiled fb.forward"), ("eager", "eager fb.forward"), ("hf_sdpa", "HF sdpa")):
            ctx.time_row(case, m, name, label)
        ctx.ratio_row(case, m, "compiled", "eager", "compiled / eager")
        ctx.ratio_row(case, m, "compiled", "hf_sdpa", "compiled / HF sdpa")
        flops = flops_per_forward(ctx.settings.size, shape)
        for name, label in (("compiled", "compiled"), ("eager", "eager"), ("hf_sdpa", "HF sdpa")):
            tflops = flops / m.stats(name).median / 1e12
            ctx.value_row(case, f"{label} achieved TFLOP/s", tflops, "TFLOP/s", note=f"{flops / 1e12:.3f} TFLOP per forward")
            if name == "compiled" and ctx.cuda:
                percent = 100 * tflops * 1e12 / peak if peak else None
                target = targets.COMPILE_PEAK_GPU if ctx.dtype == torch.bfloat16 else None
                ctx.value_row(case, "compiled, % of dense bf16 peak", percent, "%", target, shape,
                              note="" if peak else "peak unknown for this card")  # fmt: skip
