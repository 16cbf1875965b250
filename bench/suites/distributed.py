"""Distributed: 1 rank vs 2 ranks on CPU (gloo, one thread per rank), each world in its own spawned
processes within this run: parameter bytes per rank under FSDP2 (2 ranks / 1 rank, ~0.5); the
time of one SGD training step on one global batch (each rank its half); the time of a
data-parallel cache sweep (distributed.map_dataset of run_with_cache over a dataset, gathered on
rank 0). Step times are the median over rounds of the time between two barriers, on rank 0.
FSDP2 is functional_bridge.distributed.fully_shard_bridge (one group per block)."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

from ..models import build_hf, random_tokens
from ..runner import case_name

DESCRIPTION = __doc__
TARGETS = ["parameter bytes per rank, 2 ranks / 1 rank: reported (FSDP2 shards dim 0: ~0.5)",
           "step and sweep time, 2 ranks / 1 rank: reported, no target (2 shared cores)"]  # fmt: skip

CACHE_NAMES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


def run(ctx) -> None:
    launch = _launcher()
    shape = ctx.plan.optimizer  # the global batch of one training step
    dataset = (max(8, shape[0] * 2), shape[1])  # the sweep's dataset: rows x pos
    rounds = max(2, ctx.repeats(heavy=True))
    args = (ctx.settings.size, ctx.settings.seed, shape, dataset, rounds, ctx.settings.warmup)
    found = {world: ctx.attempt(f"{world} rank(s)", lambda world=world: launch(_on_rank, world_size=world, args=args, timeout=900)[0])
             for world in (1, 2)}  # fmt: skip
    if not all(found.values()):
        return
    one, two = found[1], found[2]
    case = case_name(shape)
    ctx.note(f"FSDP2 by fully_shard_bridge (a group per block); the sweep's dataset is {dataset[0]} x {dataset[1]} tokens, one chunk per rank.")
    ctx.value_row(case, "parameter bytes per rank, 1 rank", one["param_bytes"], "bytes")
    ctx.value_row(case, "parameter bytes per rank, 2 ranks", two["param_bytes"], "bytes")
    ctx.value_row(case, "parameter bytes per rank: 2 ranks / 1 rank", two["param_bytes"] / one["param_bytes"], "x")
    for key, label in (("step", "SGD step (FSDP2)"), ("sweep", "cache sweep (map_dataset)")):
        ctx.value_row(case, f"{label} time, 1 rank", 1e3 * statistics.median(one[key]), "ms", note=f"{len(one[key])} rounds")
        ctx.value_row(case, f"{label} time, 2 ranks", 1e3 * statistics.median(two[key]), "ms", note=f"{len(two[key])} rounds")
        ctx.value_row(case, f"{label}: 2 ranks / 1 rank", statistics.median(two[key]) / statistics.median(one[key]), "x")


def _launcher():
    """tests/gloo.py's run_on_ranks (spawned processes in one gloo group), shared with the tests."""
    if importlib.util.find_spec("gloo") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from gloo import run_on_ranks

    return run_on_ranks


def _timed(fn, rounds: int, warmup: int) -> list[float]:
    import torch.distributed as dist

    times = []
    for round_ in range(warmup + rounds):
        dist.barrier()
        begin = time.perf_counter()
        fn()
        dist.barrier()
        if round_ >= warmup:
            times.append(time.perf_counter() - begin)
    return times


def _on_rank(rank: int, world: int, size: str, seed: int, shape, dataset, rounds: int, warmup: int) -> dict:
    import functional_bridge as fb
    from functional_bridge import distributed as dp
    from functional_bridge.distributed.data_parallel import balanced

    analysis = fb.Bridge.from_hf(build_hf(size, "cpu", torch.float32, seed))
    rows = random_tokens(dataset, analysis.cfg.d_vocab, "cpu", seed=1)
    cache_fn = dp.cached_activations(analysis.params, analysis.cfg, CACHE_NAMES, reduce=dp.last_token)
    sweep = _timed(lambda: dp.map_dataset(cache_fn, rows), rounds, warmup)

    bridge = fb.Bridge.from_hf(build_hf(size, "cpu", torch.float32, seed))
    dp.fully_shard_bridge(bridge)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in bridge.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in local)
    optimizer = torch.optim.SGD(bridge.parameters(), lr=1e-3)
    tokens = random_tokens(shape, bridge.cfg.d_vocab, "cpu", seed=2)
    mine = balanced(shape[0], world, rank)
    batch = tokens[mine.start : mine.stop]

    def step():
        loss = fb.next_token_loss(bridge(batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return {"param_bytes": param_bytes, "step": _timed(step, rounds, warmup), "sweep": sweep}
