"""Training with a standard optimizer over bridge.parameters(): the HF leaves themselves."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ..bridge import Bridge
from ..func import next_token_loss
from .data import training_batches


@dataclass
class TrainSettings:
    steps: int = 2000
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


class ProgressBar:
    """A one-line progress bar with loss and steps/s (no dependency)."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, step: int, loss: float, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_draw < 0.2:
            return
        self.last_draw = now
        done = int(self.width * step / self.total)
        rate = step / max(now - self.start, 1e-9)
        bar = "#" * done + "." * (self.width - done)
        self.stream.write(f"\r[{bar}] step {step}/{self.total}  loss {loss:.3f}  {rate:.0f} steps/s ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def train(bridge: Bridge, settings: TrainSettings, progress: bool = True) -> TrainResult:
    """AdamW with linear warmup on repeated sequences. Ctrl-C stops cleanly after the current
    step: the result says how far it got, and the model is usable."""
    torch.manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        bridge.parameters(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
    )
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / settings.warmup))
    batches = training_batches(settings.batch, settings.lengths, bridge.cfg.d_vocab, settings.seed, bridge.device)
    bar = ProgressBar(settings.steps) if progress else None
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
