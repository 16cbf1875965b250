"""The run: its settings, the shared models, what each suite records, and error isolation.

A suite is a function ``run(ctx)`` that measures and records rows through the Context. A suite
that raises is recorded as failed, with its traceback, and the next suite runs.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .models import Models, Plan, Shape, plan_for
from .targets import Target
from .timing import Clock, Measurement, Stats, measure

LABELS = {"ours": "ours forward", "hf_sdpa": "HF sdpa", "hf_eager": "HF eager", "tl": "HookedTransformer"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Settings:
    suites: list[str]
    device: str = "cpu"
    dtype: str = "float32"
    size: str = "small"
    anchors: bool = False
    repeats: int = 10
    warmup: int = 2
    quick: bool = False
    threads: int = 0
    shapes: tuple[Shape, ...] = ()
    seed: int = 0
    compile_mode: str = "default"
    min_sample_s: float = 0.02
    malloc: str = "retain"  # bench/allocator.py
    malloc_effect: str = ""  # what applying it did, for the report


@dataclass
class Row:
    case: str  # e.g. "4x128"
    measure: str  # what was measured
    unit: str  # "ms", "x", "bytes", "TFLOP/s", "%", "abs", ...
    value: float | None  # the median (or the single value)
    q1: float | None = None
    q3: float | None = None
    min: float | None = None
    max: float | None = None
    n: int | None = None
    target: str | None = None
    met: bool | None = None  # None: no target, or a target set for another setting
    note: str = ""


@dataclass
class SuiteResult:
    name: str
    description: str
    targets: list[str]
    status: str = "ok"
    error: str | None = None
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["rows"] = [asdict(row) for row in self.rows]
        return data


class Context:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.device = settings.device
        self.dtype = DTYPES[settings.dtype]
        self.clock = Clock(settings.device)
        self.models = Models(settings.size, settings.device, settings.seed)
        self.plan: Plan = plan_for(settings.size, settings.device, settings.shapes or None)
        self.current: SuiteResult | None = None

    # settings ---------------------------------------------------------------------------------

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def repeats(self, heavy: bool = False) -> int:
        """Rounds per measurement; heavy suites (a loop of hundreds of forwards per round) use
        half, at least 3 (the count is in every row's n)."""
        r = self.settings.repeats
        return max(min(r, 3), (r + 1) // 2) if heavy else r

    def measure(self, case: str, contenders: dict[str, Callable[[], object]], heavy: bool = False) -> Measurement:
        m = measure(contenders, self.clock, self.repeats(heavy), self.settings.warmup, self.settings.min_sample_s)
        self.current.samples[case] = m.samples
        return m

    # recording --------------------------------------------------------------------------------

    def judge(self, row: Row, target: Target | None, shape: Shape | None) -> Row:
        """Attach a target to a row, and decide met/missed where the target applies."""
        if target is None:
            return row
        row.target = target.text() + (f"; {target.why}" if target.why else "")
        s = self.settings
        if row.value is not None and target.applies(torch.device(s.device).type, s.dtype, s.size, shape):
            row.met = target.met(row.value)
        return row

    def time_row(self, case: str, m: Measurement, name: str, label: str | None = None, note: str = "") -> Row:
        label = label or LABELS.get(name, name)
        st = m.stats(name).scaled(1e3)
        note = note or (f"{m.number[name]} calls per sample" if m.number[name] > 1 else "")
        return self.add(Row(case, f"{label} time", "ms", st.median, st.q1, st.q3, st.min, st.max, st.n, note=note))

    def ratio_row(
        self, case: str, m: Measurement, numerator: str, denominator: str, label: str,
        target: Target | None = None, shape: Shape | None = None, note: str = "",
    ) -> Row:  # fmt: skip
        st = m.ratio(numerator, denominator)
        row = Row(case, label, "x", st.median, st.q1, st.q3, st.min, st.max, st.n, note=note)
        return self.add(self.judge(row, target, shape))

    def value_row(
        self, case: str, label: str, value: float | None, unit: str, target: Target | None = None,
        shape: Shape | None = None, stats: Stats | None = None, note: str = "",
    ) -> Row:  # fmt: skip
        row = Row(case, label, unit, value, note=note)
        if stats is not None:
            row.q1, row.q3, row.min, row.max, row.n = stats.q1, stats.q3, stats.min, stats.max, stats.n
        return self.add(self.judge(row, target, shape))

    def add(self, row: Row) -> Row:
        self.current.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.current.notes.append(text)

    def anchor(self):
        """HookedTransformer built from the same HF weights, with --anchors (None without, or
        when it cannot be built: the failure is noted)."""
        if not self.settings.anchors:
            return None
        return self.attempt("HookedTransformer anchor", lambda: self.models.anchor(self.dtype))

    def attempt(self, label: str, fn: Callable[[], object]):
        """Run one case; on failure record the error as a note and return None (the suite goes on)."""
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - a benchmark case may fail in any way
            self.note(f"{label} failed: {type(error).__name__}: {error}".strip()[:2000])
            self.current.tracebacks.append(traceback.format_exc(limit=8))
            return None


def case_name(shape: Shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def run_suite(ctx: Context, name: str, module) -> SuiteResult:
    result = SuiteResult(name, module.DESCRIPTION.strip(), list(module.TARGETS))
    ctx.current = result
    begin = time.perf_counter()
    try:
        module.run(ctx)
    except Exception as error:  # noqa: BLE001 - one suite's failure must not stop the others
        result.status = "error"
        result.error = f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
    finally:
        result.seconds = time.perf_counter() - begin
        ctx.current = None
        if ctx.cuda:
            torch.cuda.empty_cache()
    return result
