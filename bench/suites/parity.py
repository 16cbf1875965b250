"""Parity: the measured max abs logit differences behind the project's notes. In float32:
ours vs HF eager and HF sdpa (and HF eager vs sdpa, HF's own floor); left-padded rows vs each
row run alone (ours, and HF given position_ids from the mask); bf16 and fp16 vs float32, for
ours and for HF (sdpa), and ours vs HF in each. Whatever --dtype says, this suite builds its
float32 model and casts copies. The logits' scale is reported beside them (HF's random init)."""

from __future__ import annotations

import copy

import torch

import functional_bridge as fb

from .. import targets
from ..models import left_padded_mask, random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [
    f"float32, ours vs HF, padded vs alone: max abs diff {targets.AGREE_FP32.text()}",
    f"bf16/fp16: ours' error vs float32 / HF's error vs float32 {targets.LOW_PRECISION_VS_HF.text()}",
]


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def run(ctx) -> None:
    fp32 = torch.float32
    hf, eager, bridge = ctx.models.hf(fp32), ctx.models.hf_eager(fp32), ctx.models.bridge(fp32)
    shape = ctx.plan.parity
    case = case_name(shape)
    tokens = random_tokens(shape, bridge.cfg.d_vocab, ctx.device, seed=6)
    with torch.inference_mode():
        ours = bridge(tokens)
        sdpa = hf(tokens, use_cache=False).logits
        hf_eager = eager(tokens, use_cache=False).logits
        ctx.value_row(case, "max |logit| (scale, fp32)", ours.abs().max().item(), "abs")
        ctx.value_row(case, "fp32: ours vs HF eager", _diff(ours, hf_eager), "abs", targets.AGREE_FP32)
        ctx.value_row(case, "fp32: ours vs HF sdpa", _diff(ours, sdpa), "abs", targets.AGREE_FP32)
        ctx.value_row(case, "fp32: HF eager vs HF sdpa", _diff(hf_eager, sdpa), "abs")
        _padding(ctx, bridge, hf, tokens, case)
        for low in (torch.bfloat16, torch.float16):
            ctx.attempt(f"{low} parity", lambda low=low: _low_precision(ctx, hf, ours, sdpa, tokens, case, low))


def _padding(ctx, bridge, hf, tokens, case) -> None:
    mask = left_padded_mask(tuple(tokens.shape), ctx.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ours = bridge(tokens, attention_mask=mask)
    theirs = hf(tokens, attention_mask=mask, position_ids=positions, use_cache=False).logits
    worst_ours = worst_hf = 0.0
    for row in range(tokens.shape[0]):
        real = mask[row].bool()
        alone = tokens[row : row + 1, real]
        worst_ours = max(worst_ours, _diff(ours[row, real], bridge(alone)[0]))
        worst_hf = max(worst_hf, _diff(theirs[row, real], hf(alone, use_cache=False).logits[0]))
    lengths = mask.sum(-1).tolist()
    ctx.value_row(case, "fp32: ours left-padded vs each row alone", worst_ours, "abs", targets.AGREE_FP32,
                  note=f"real lengths {lengths}")  # fmt: skip
    ctx.value_row(case, "fp32: HF sdpa left-padded (position_ids from mask) vs alone", worst_hf, "abs")


def _low_precision(ctx, hf, ours32, hf32, tokens, case, dtype) -> None:
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    hf_low = copy.deepcopy(hf).to(dtype)
    bridge_low = fb.Bridge.from_hf(hf_low)
    ours = bridge_low(tokens)
    theirs = hf_low(tokens, use_cache=False).logits
    ours_error, hf_error = _diff(ours, ours32), _diff(theirs, hf32)
    ctx.value_row(case, f"{name}: ours vs ours fp32", ours_error, "abs")
    ctx.value_row(case, f"{name}: HF sdpa vs HF fp32", hf_error, "abs")
    ctx.value_row(case, f"{name}: ours vs HF sdpa ({name} both)", _diff(ours, theirs), "abs")
    ctx.value_row(case, f"{name}: ours' error / HF's error (vs fp32)", ours_error / max(hf_error, 1e-30), "x",
                  targets.LOW_PRECISION_VS_HF)  # fmt: skip
    if ours.dtype != dtype:
        ctx.note(f"{name}: our logits came back as {ours.dtype}, expected {dtype}")
