"""The training progress line: steps, loss, a warmed-up rate and an ETA that includes the
analysis still to come.

On a terminal it redraws one line with carriage returns; on anything else (a log file, a pipe,
CI) it prints a plain line every tenth of the run instead, so logs hold no `\\r` noise.
"""

from __future__ import annotations

import math
import sys
import time


class RateMeter:
    """Steps per second as an exponential moving average of per-interval rates, each interval
    weighted by its duration (time constant `time_constant` seconds), ignoring the first
    `warmup_steps` steps (allocator and kernel warm-up make them slow and unrepresentative).
    Weighting by time, not by interval, keeps the ETA steady when step times jitter (a shared
    machine; averaging over a fixed count of ~0.05 s intervals swung the ETA by a third) and
    still follows a lasting slowdown within a few time constants."""

    def __init__(self, warmup_steps: int = 5, time_constant: float = 3.0):
        self.warmup_steps, self.time_constant = warmup_steps, time_constant
        self.rate: float | None = None
        self._mark: tuple[int, float] | None = None  # (step, time) at the last measurement

    def observe(self, step: int, now: float) -> None:
        if step < self.warmup_steps:
            return
        if self._mark is None:
            self._mark = (step, now)
            return
        last_step, last_time = self._mark
        if step == last_step or now - last_time < 0.05:  # too short an interval to measure
            return
        seconds = now - last_time
        rate = (step - last_step) / seconds
        weight = 1.0 - math.exp(-seconds / self.time_constant)
        self.rate = rate if self.rate is None else self.rate + weight * (rate - self.rate)
        self._mark = (step, now)


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 90 else f"{seconds // 60} min {seconds % 60:02d} s"


class ProgressBar:
    """Training progress on `stream` (stderr by default).

    `after_steps` is the work still to come after training (the analysis), in training-step
    equivalents, so the ETA covers the whole run: (remaining steps + after_steps) / rate.
    """

    def __init__(self, total: int, stream=None, width: int = 30, after_steps: float = 0.0,
                 clock=time.perf_counter):  # fmt: skip
        self.total, self.width, self.after_steps, self.clock = total, width, after_steps, clock
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())  # a terminal: redraw in place
        self.meter = RateMeter()
        self.last_draw = -float("inf")
        self.next_line = 1  # non-terminal: the next tenth of the run to report at

    def eta_seconds(self, step: int) -> float | None:
        rate = self.meter.rate
        return None if rate is None else (self.total - step + self.after_steps) / rate

    def describe(self, step: int, loss: float) -> str:
        rate = self.meter.rate
        speed = f"{rate:.0f} steps/s" if rate is not None else "measuring speed"
        eta = self.eta_seconds(step)
        left = f"  ETA {format_seconds(eta)}" if eta is not None and step < self.total else ""
        return f"step {step}/{self.total}  loss {loss:.3f}  {speed}{left}"

    def update(self, step: int, loss: float, force: bool = False) -> None:
        now = self.clock()
        self.meter.observe(step, now)
        if self.live:
            if force or now - self.last_draw >= 0.2:
                self.last_draw = now
                done = int(self.width * step / self.total)
                bar = "#" * done + "." * (self.width - done)
                self.stream.write(f"\r[{bar}] {self.describe(step, loss)} ")
                self.stream.flush()
        elif force or step * 10 >= self.next_line * self.total:
            self.next_line = step * 10 // self.total + 1
            self.stream.write(f"{self.describe(step, loss)}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
