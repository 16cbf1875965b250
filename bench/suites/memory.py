"""Memory: parameter bytes, element count and number of parameter objects, ours vs HF (the
bridge holds HF's own tensors, so bytes and numel must be equal); peak memory of one
run_with_cache call (every hook) vs the HF forward, HF eager with attentions and hidden states,
our plain forward, and with --anchors HookedTransformer's run_with_cache, each in a fresh
interpreter (bench/memprobe.py says how peaks are taken)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .. import targets
from ..memprobe import MALLOC_ENV as MEMPROBE_MALLOC_ENV
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = [f"parameter bytes and numel, ours - HF {targets.PARAM_BYTES.text()}", "peak memory: reported, no target"]

MIB = 2**20


def run(ctx) -> None:
    _parameters(ctx)
    _peaks(ctx)


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _parameters(ctx) -> None:
    hf, bridge = ctx.models.hf(ctx.dtype), ctx.models.bridge(ctx.dtype)
    case = ctx.settings.size
    ours, theirs = list(bridge.parameters()), list(hf.parameters())  # each tensor once, as Module yields them
    ours_bytes, hf_bytes = _bytes(ours), _bytes(theirs)
    ours_numel, hf_numel = sum(p.numel() for p in ours), sum(p.numel() for p in theirs)
    ctx.value_row(case, "parameter bytes, ours", ours_bytes, "bytes")
    ctx.value_row(case, "parameter bytes, HF", hf_bytes, "bytes")
    ctx.value_row(case, "parameter bytes, ours - HF", ours_bytes - hf_bytes, "bytes", targets.PARAM_BYTES)
    ctx.value_row(case, "parameter numel, ours", ours_numel, "")
    ctx.value_row(case, "parameter numel, HF", hf_numel, "")
    ctx.value_row(case, "parameter numel, ours - HF", ours_numel - hf_numel, "", targets.PARAM_BYTES)
    ctx.value_row(case, "parameter objects, ours", len(ours), "")
    ctx.value_row(case, "parameter objects, HF", len(theirs), "")
    hf_ids = {id(p) for p in theirs}
    ctx.value_row(case, "ours that are HF's own objects", sum(id(p) in hf_ids for p in ours), "")
    anchor = ctx.anchor()
    if anchor is not None:
        tl = list(anchor.parameters())
        ctx.value_row(case, "parameter bytes, HookedTransformer", _bytes(tl), "bytes",
                      note="HookedTransformer stores W_U apart from W_E")  # fmt: skip
        ctx.value_row(case, "parameter objects, HookedTransformer", len(tl), "")


def _peaks(ctx) -> None:
    shape = max(ctx.plan.shapes, key=lambda s: s[0] * s[1])
    case = case_name(shape)
    contenders = ["hf_forward", "hf_eager_outputs", "ours_forward", "ours_cache"]
    if ctx.settings.anchors:
        contenders.append("tl_cache")
    results = {}
    if ctx.settings.quick:  # one fresh interpreter measures them one after another
        ctx.note("--quick: every contender measured in one fresh interpreter, one after another.")
        found = ctx.attempt("memory probe", lambda: _probe(ctx, contenders, shape)) or []
        results = {result["contender"]: result for result in found}
    else:  # a fresh interpreter each
        for name in contenders:
            found = ctx.attempt(f"memory probe {name}", lambda: _probe(ctx, [name], shape))
            results[name] = found[0] if found else None
    labels = {"hf_forward": "HF sdpa forward", "hf_eager_outputs": "HF eager + attentions + hidden states",
              "ours_forward": "ours forward", "ours_cache": "ours run_with_cache (every hook)",
              "tl_cache": "HookedTransformer run_with_cache"}  # fmt: skip
    for name, result in results.items():
        if result is None:
            continue
        ctx.value_row(case, f"peak: {labels[name]}", result["peak_bytes"] / MIB, "MiB", note=result["method"])
        ctx.value_row(case, f"outputs kept: {labels[name]}", result["output_tensor_bytes"] / MIB, "MiB",
                      note="tensor bytes of logits (+ cache); a view is counted at its own size")  # fmt: skip

    def ratio(a, b, label):
        if results.get(a) and results.get(b) and results[b]["peak_bytes"] > 0:
            ctx.value_row(case, label, results[a]["peak_bytes"] / results[b]["peak_bytes"], "x")

    ratio("ours_cache", "hf_forward", "peak: ours cache / HF forward")
    ratio("ours_cache", "hf_eager_outputs", "peak: ours cache / HF eager + outputs")
    ratio("ours_forward", "hf_forward", "peak: ours forward / HF forward")
    ratio("ours_cache", "tl_cache", "peak: ours cache / HookedTransformer cache")


def _probe(ctx, contenders: list[str], shape) -> list[dict]:
    s = ctx.settings
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env.update(MEMPROBE_MALLOC_ENV)
    command = [sys.executable, "-m", "bench.memprobe", *(f"--contender={name}" for name in contenders), "--size", s.size, "--device", s.device,
               "--dtype", s.dtype, "--shape", case_name(shape), "--threads", str(s.threads), "--seed", str(s.seed)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=root, env=env, timeout=900)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
