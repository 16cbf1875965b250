"""Smoke test of the benchmark harness (python -m bench): every suite once at the tiny size
with the fewest rounds, in this process, then checks on what it wrote: the reports exist,
no suite failed, the correctness figures (parity, vmap vs loop) hold, and the parameter bytes
equal HF's exactly. The compile suite runs in its own test, marked slow."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level package beside the installed library
    sys.path.insert(0, str(ROOT))

from bench import report, suites  # noqa: E402
from bench.__main__ import main  # noqa: E402
from bench.runner import Context, Settings, run_suite  # noqa: E402
from bench.timing import Clock, measure  # noqa: E402
from tolerance import FLOOR_ULPS, assert_within_gap, check, eps  # noqa: E402

FAST = [name for name in suites.NAMES if name != "compile"]


def run_bench(out, names, anchors=False):
    """bench at the tiny size, one round, one thread (no OpenMP barriers to wait at on a busy
    machine); restores the thread count."""
    threads = torch.get_num_threads()
    argv = ["--size", "tiny", "--quick", "--repeats", "1", "--warmup", "1", "--threads", "1", "--out", str(out)]
    argv += [arg for name in names for arg in ("--suite", name)] + (["--anchors"] if anchors else [])
    try:
        main(argv)
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    anchors = importlib.util.find_spec("transformer_lens") is not None
    out = tmp_path_factory.mktemp("bench")
    data, markdown = run_bench(out, FAST, anchors=anchors)
    return out, data, markdown


def rows(data, suite):
    return {row["measure"]: row for row in data["suites"][suite]["rows"]}


def test_every_suite_runs_and_writes_its_reports(fast_run):
    out, data, markdown = fast_run
    assert list(data["suites"]) == FAST
    for name, suite in data["suites"].items():
        assert suite["status"] == "ok", f"{name}: {suite['error']}"
        assert suite["rows"], name
        assert f"## {name}" in markdown
    assert data["meta"]["torch threads"] == 1
    assert "## Targets" in markdown and "| suite | case | measure |" in markdown
    if importlib.util.find_spec("matplotlib"):
        assert (out / "chart.png").stat().st_size > 0
    else:
        assert "matplotlib is not importable" in markdown


def test_every_timing_and_ratio_is_a_positive_median_with_its_spread(fast_run):
    _, data, _ = fast_run
    for suite in data["suites"].values():
        for row in suite["rows"]:
            if row["unit"] in ("ms", "x") and row["value"] is not None:
                assert row["value"] > 0 and math.isfinite(row["value"]), row
            if row["n"] and row["n"] > 1:
                assert row["min"] <= row["q1"] <= row["value"] <= row["q3"] <= row["max"], row


def test_targets_are_stated_and_judged(fast_run):
    _, data, _ = fast_run
    judged = [(name, row) for name, suite in data["suites"].items() for row in suite["rows"] if row["target"]]
    assert judged
    for suite, row in judged:
        assert row["met"] in (True, False, None)
        # correctness, not speed (the parity suite's figures: grounded in test_parity_figures_are_sane)
        if "harness bound" in row["target"] and row["value"] is not None and suite != "parity":
            assert row["met"] is True, row
    # the CPU-small targets are shown at the tiny size but not judged there
    forward = [row for row in data["suites"]["forward"]["rows"] if row["measure"] == "ours / HF sdpa"]
    assert forward and all(row["met"] is None and "CPU fp32 small" in row["target"] for row in forward)
    assert rows(data, "overheads")["Bridge.from_hf time"]["met"] is True


def test_parity_figures_are_sane(fast_run):
    """Grounded in the suite's own rows: float32 ours-vs-HF within FACTOR times HF's own floor (its
    eager-vs-sdpa gap; its padded rows vs alone), or FLOOR_ULPS units of rounding at the logits'
    scale; half precision as accurate as HF's, up to one unit of the output's last rounding."""
    _, data, _ = fast_run
    parity = rows(data, "parity")
    scale = parity["max |logit| (scale, fp32)"]["value"]
    assert scale > 1e-3
    floor = FLOOR_ULPS * eps(torch.float32) * scale
    hf_floors = {
        "fp32: ours vs HF eager": "fp32: HF eager vs HF sdpa",
        "fp32: ours vs HF sdpa": "fp32: HF eager vs HF sdpa",
        "fp32: ours left-padded vs each row alone": "fp32: HF sdpa left-padded (position_ids from mask) vs alone",
    }
    for name, hf_floor in hf_floors.items():
        assert parity[name]["value"] >= 0, name
        assert_within_gap(parity[name]["value"], parity[hf_floor]["value"], floor=floor, what=name)
    for low, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        error, hf_error = parity[f"{low}: ours vs ours fp32"]["value"], parity[f"{low}: HF sdpa vs HF fp32"]["value"]
        assert error > 0, low
        check(error - hf_error, eps(dtype) * scale, f"{low}: error over HF's")


def test_parameter_bytes_equal_hf_exactly(fast_run):
    _, data, _ = fast_run
    memory = rows(data, "memory")
    assert memory["parameter bytes, ours"]["value"] == memory["parameter bytes, HF"]["value"] > 0
    assert memory["parameter bytes, ours - HF"]["value"] == 0 and memory["parameter bytes, ours - HF"]["met"] is True
    assert memory["parameter numel, ours"]["value"] == memory["parameter numel, HF"]["value"]
    assert memory["parameter objects, ours"]["value"] == memory["parameter objects, HF"]["value"]
    assert memory["ours that are HF's own objects"]["value"] == memory["parameter objects, HF"]["value"]
    peak = memory["peak: ours run_with_cache (every hook)"]["value"]
    kept = memory["outputs kept: ours run_with_cache (every hook)"]["value"]
    assert peak > 0 and kept > memory["outputs kept: ours forward"]["value"]


def test_distributed_rows_shard_the_parameters(fast_run):
    """FSDP2 shards each leaf's dim 0 over 2 ranks: rank 0 holds half, or one row more per leaf
    whose dim 0 is odd (the tiny model has none: exactly half)."""
    _, data, _ = fast_run
    distributed = rows(data, "distributed")
    one, two = distributed["parameter bytes per rank, 1 rank"]["value"], distributed["parameter bytes per rank, 2 ranks"]["value"]
    assert one > 0 and two == one / 2
    for label in ("SGD step (FSDP2)", "cache sweep (map_dataset)"):
        assert distributed[f"{label}: 2 ranks / 1 rank"]["value"] > 0


def test_facade_hook_rows_compare_the_stateful_path_with_the_pure_layer(fast_run):
    """The facade's three paths (no hook, run_with_hooks, a registered permanent hook) return
    exactly the pure layer's result (the same arithmetic: the facade only hands its hooks to it)
    and each ratio is timed against it in the same rounds, with the target stated."""
    _, data, _ = fast_run
    overheads = data["suites"]["overheads"]["rows"]
    facade = {row["measure"]: row for row in overheads if row["case"].startswith("facade hooks")}
    for stateful, pure in (("facade_forward", "pure_forward"), ("facade_run_with_hooks", "pure_hooked"),
                           ("facade_perma_hook", "pure_hooked")):  # fmt: skip
        assert facade[f"max |{stateful} - {pure}|"]["value"] == 0, stateful
    ratios = [row for row in facade.values() if row["unit"] == "x"]
    assert len(ratios) == 3 and all(row["target"].startswith("<= 1.05") and row["n"] >= 1 for row in ratios)


def test_hf_vmap_attempt_is_recorded_either_way(fast_run):
    _, data, _ = fast_run
    grads = data["suites"]["grads"]
    timed = any(row["measure"].startswith("HF functional_call") for row in grads["rows"])
    failed = any(note.startswith("HF + functional_call + vmap(grad) failed") for note in grads["notes"])
    assert timed or failed


@pytest.mark.slow
def test_compile_suite(tmp_path):
    data, _ = run_bench(tmp_path, ["compile"])
    suite = data["suites"]["compile"]
    assert suite["status"] == "ok", suite["error"]
    measures = rows(data, "compile")
    assert measures["compile time (first call)"]["value"] > 0
    assert measures["max |compiled - eager| (logits)"]["met"] is True


def test_a_failing_suite_is_recorded_and_the_others_still_report(tmp_path):
    def boom(ctx):
        raise RuntimeError("deliberate failure")

    ctx = Context(Settings(suites=["broken"], size="tiny", repeats=1, warmup=1))
    broken = run_suite(ctx, "broken", types.SimpleNamespace(DESCRIPTION="a suite that fails", TARGETS=[], run=boom))
    fine = run_suite(ctx, "fine", types.SimpleNamespace(DESCRIPTION="ok", TARGETS=[], run=lambda ctx: ctx.note("ran")))
    assert broken.status == "error" and "deliberate failure" in broken.error
    assert fine.status == "ok" and fine.notes == ["ran"]
    paths = report.write(tmp_path, {"date": "now"}, [broken, fine])
    data = json.loads(paths["json"].read_text())
    assert data["suites"]["broken"]["status"] == "error"
    assert "**ERROR**" in paths["markdown"].read_text()


def test_rounds_interleave_the_contenders_after_warm_up():
    calls = []
    m = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, Clock("cpu"), repeats=3,
                warmup=1, min_sample_s=0)  # fmt: skip
    assert calls == ["a", "b"] * 4
    assert len(m.samples["a"]) == len(m.samples["b"]) == 3
    assert m.ratio("a", "b").n == 3


def test_chart_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "matplotlib is not importable" in report.chart([], tmp_path / "chart.png")
    assert not (tmp_path / "chart.png").exists()
