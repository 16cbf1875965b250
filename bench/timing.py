"""Timing: interleaved repetitions, medians with their spread, ratios measured in one process.

Every figure the harness reports is a median over repetitions in which the contenders take
turns (A B C A B C ...), after each has been warmed up, so slow drift of the machine (another
process, thermal state, the allocator) lands on all of them alike. A comparison is the median of
the per-round ratios a_r / b_r, with their quartiles (IQR) and extremes. On CUDA, each sample is
bracketed by torch.cuda.synchronize() and timed with CUDA events.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Stats:
    """Median and spread of a list of samples (seconds, ratios, bytes ...)."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        values = sorted(float(v) for v in samples)
        if not values:
            raise ValueError("no samples")
        if len(values) == 1:
            q1 = q3 = values[0]
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, values[0], values[-1], len(values))

    def scaled(self, factor: float) -> "Stats":
        return Stats(*(getattr(self, f) * factor for f in ("median", "q1", "q3", "min", "max")), self.n)


class Clock:
    """Seconds per call of fn, averaged over `number` back-to-back calls; synchronises on CUDA."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object], number: int = 1) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        begin = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - begin) / number


@dataclass
class Measurement:
    """Per-call seconds of each contender, one sample per round, rounds interleaved."""

    samples: dict[str, list[float]]
    number: dict[str, int]  # calls per sample (short calls are repeated to beat timer noise)
    warmup: int

    def stats(self, name: str) -> Stats:
        return Stats.of(self.samples[name])

    def ratio(self, numerator: str, denominator: str) -> Stats:
        """Median and spread of the per-round ratios numerator / denominator."""
        a, b = self.samples[numerator], self.samples[denominator]
        return Stats.of([x / y for x, y in zip(a, b)])


def measure(
    contenders: Mapping[str, Callable[[], object]],
    clock: Clock,
    repeats: int,
    warmup: int = 1,
    min_sample_s: float = 0.02,
    max_number: int = 200,
) -> Measurement:
    """Warm every contender up, pick how many calls make one sample, then time `repeats`
    rounds in which every contender runs once, always in the same A B C order."""
    names = list(contenders)
    last = {}
    for _ in range(max(1, warmup)):
        for name in names:
            last[name] = clock(contenders[name])
    number = {
        name: max(1, min(max_number, math.ceil(min_sample_s / max(last[name], 1e-9)))) for name in names
    }
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # no collector pauses inside a sample; refcounting still frees tensors
    try:
        for _ in range(repeats):
            for name in names:
                samples[name].append(clock(contenders[name], number[name]))
    finally:
        if was_enabled:
            gc.enable()
    return Measurement(samples, number, warmup)


def time_once(fn: Callable[[], object], clock: Clock) -> tuple[float, object]:
    """(seconds, result) of one call: compile times, build times."""
    clock.sync()
    begin = time.perf_counter()
    result = fn()
    clock.sync()
    return time.perf_counter() - begin, result
