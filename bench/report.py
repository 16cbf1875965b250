"""Writing the results: results.json (everything, raw samples included), results.md (one
table of every target, then one table per suite) and chart.png (every ratio with its IQR and
target, when matplotlib is importable)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .runner import Row, SuiteResult


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    if unit in ("", "bytes") and float(value).is_integer():
        return f"{int(value):,}"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e6):
        return f"{value:.2e}"
    if magnitude >= 100:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.3f}"
    return f"{value:.4f}"


def met_text(row: Row) -> str:
    if row.target is None:
        return ""
    if row.met is None:
        return "n/a" if row.value is not None else "no value"
    return "**met**" if row.met else "**MISSED**"


def spread_text(row: Row) -> str:
    if row.q1 is None or row.n in (None, 1):
        return ""
    return f"IQR [{fmt(row.q1, row.unit)}, {fmt(row.q3, row.unit)}], min-max [{fmt(row.min, row.unit)}, {fmt(row.max, row.unit)}], n={row.n}"


def _row_line(row: Row, suite: str | None = None) -> str:
    cells = ([suite] if suite else []) + [
        row.case, row.measure, f"{fmt(row.value, row.unit)} {row.unit}".strip(), spread_text(row),
        row.target or "", met_text(row), row.note,
    ]  # fmt: skip
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(meta: dict, results: list[SuiteResult], chart_note: str) -> str:
    lines = ["# functional_bridge benchmarks", ""]
    lines += ["| | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in meta.items()]
    lines += ["", "Every time is a median over interleaved rounds (contenders take turns, after warm-up); every",
              "ratio is the median of per-round ratios measured in this process, with its IQR and range.", ""]  # fmt: skip
    lines += ["## Targets", "", "| suite | case | measure | median | spread | target | met | note |", "|---|---|---|---|---|---|---|---|"]
    for result in results:
        lines += [_row_line(row, result.name) for row in result.rows if row.target]
        if result.status != "ok":
            lines.append(f"| {result.name} | | suite failed | | | | **ERROR** | {result.error.splitlines()[0]} |")
    lines += ["", chart_note, ""]
    for result in results:
        lines += [f"## {result.name}", "", result.description, ""]
        lines += ["Targets: " + "; ".join(result.targets), ""]
        lines.append(f"Status: {result.status}, {result.seconds:.1f} s.")
        if result.error:
            lines += ["", "```", result.error.strip()[-3000:], "```"]
        if result.rows:
            lines += ["", "| case | measure | median | spread | target | met | note |", "|---|---|---|---|---|---|---|"]
            lines += [_row_line(row) for row in result.rows]
        if result.notes:
            lines += [""] + [f"- {note}" for note in result.notes]
        lines.append("")
    return "\n".join(lines)


def chart(results: list[SuiteResult], path: Path) -> str:
    """chart.png with every ratio row; returns a line saying what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "No chart: matplotlib is not importable (pip install -e .[plot]); skipped."
    rows = [(f"{r.name}: {row.measure} [{row.case}]", row) for r in results for row in r.rows
            if row.unit == "x" and row.value is not None]  # fmt: skip
    if not rows:
        return "No chart: no ratios were measured."
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    for i, (label, row) in enumerate(rows):
        low = row.value - (row.q1 if row.q1 is not None else row.value)
        high = (row.q3 if row.q3 is not None else row.value) - row.value
        color = {True: "tab:green", False: "tab:red"}.get(row.met, "tab:gray")
        ax.barh(i, row.value, xerr=[[low], [high]], color=color, alpha=0.8)
        if row.target:
            try:
                bound = float(row.target.split()[1])
                ax.plot([bound, bound], [i - 0.4, i + 0.4], color="black", linewidth=2)
            except (IndexError, ValueError):
                pass
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="gray", linewidth=0.5)
    ax.set_xlabel("ratio (median, IQR whiskers; black tick: target; green met, red missed, grey no target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"Chart: {path.name}."


def write(out: Path, meta: dict, results: list[SuiteResult]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    chart_path = out / "chart.png"
    chart_note = chart(results, chart_path)
    if chart_path.exists():
        paths["chart"] = chart_path
    data = {"meta": meta, "chart": chart_note, "suites": {r.name: r.to_json() for r in results}}
    paths["json"].write_text(json.dumps(data, indent=1, default=str))
    paths["markdown"].write_text(markdown(meta, results, chart_note))
    return paths
