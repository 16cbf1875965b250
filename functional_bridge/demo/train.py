"""Training with a standard optimizer over bridge.parameters(): the HF leaves themselves."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..bridge import Bridge
from ..func import next_token_loss
from .data import training_batches
from .progress import ProgressBar


@dataclass
class TrainSettings:
    # The work, sized to finish under a minute on a quiet 2-core CPU at one thread: induction
    # heads form (unseen-length score > 0.5) at step 700-800 for seeds 0-4, and 1200 steps give
    # every seed 0-9 a head that zeroing the previous-token heads removes. Fewer tokens a step
    # (batch 16, or half-lengths 4-16) delayed the formation past 1200 steps; batch 64 formed it
    # at 500 steps but each step costs 1.8 times as much; lr 1e-3, 3e-3 and 4e-3 were slower.
    steps: int = 1200
    batch: int = 32
    lengths: tuple[int, int] = (8, 24)  # half-lengths L drawn per batch
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0


@dataclass
class TrainResult:
    steps_done: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False


def train(bridge: Bridge, settings: TrainSettings, progress: bool = True, after_steps: float = 0.0,
          stream=None) -> TrainResult:  # fmt: skip
    """AdamW with linear warmup on repeated sequences. Ctrl-C stops cleanly after the current
    step: the result says how far it got, and the model is usable. The progress line goes to
    `stream` (stderr); its ETA adds `after_steps` step-equivalents for the work after training."""
    torch.manual_seed(settings.seed)
    # fused: one kernel for all 21 leaves instead of a Python loop over them (a step of this
    # tiny model is mostly per-op overhead); CPU and CUDA have it
    optimizer = torch.optim.AdamW(
        bridge.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay,
        fused=bridge.device.type in ("cpu", "cuda"),
    )  # fmt: skip
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup))
    batches = training_batches(settings.batch, settings.lengths, bridge.cfg.d_vocab, settings.seed, bridge.device)
    bar = ProgressBar(settings.steps, stream, after_steps=after_steps) if progress else None
    result = TrainResult(steps_done=0, seconds=0.0)
    start = time.perf_counter()
    try:
        for step in range(settings.steps):
            tokens = next(batches)
            loss = next_token_loss(bridge(tokens), tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            warmup.step()
            result.losses.append(loss.item())
            result.steps_done = step + 1
            if bar:
                bar.update(step + 1, result.losses[-1], force=step + 1 == settings.steps)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        result.seconds = time.perf_counter() - start
        if bar:
            bar.close()
    return result
