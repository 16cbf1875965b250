"""The tolerance margins a test run recorded (tests/tolerance.py writes them when FB_MARGINS is set):
per test file, the worst margin (measured / bound; below 1 passes), where it was, and how many
assertions were recorded.

    FB_MARGINS=/tmp/margins.jsonl python -m pytest
    python tests/margins.py /tmp/margins.jsonl [more.jsonl ...] [--top N]

A margin recorded by check_above (an effect that must show above rounding) is bound / measured."""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict


def load(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def table(records: list[dict]) -> str:
    by_file: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_file[r["test"].split("::", 1)[0]].append(r)
    lines = ["| test file | worst margin | where | assertions |", "|---|---|---|---|"]
    for name in sorted(by_file, key=lambda f: -max(r["margin"] for r in by_file[f])):
        worst = max(by_file[name], key=lambda r: r["margin"])
        where = worst["test"].split("::", 1)[-1] + (f" ({worst['what']})" if worst["what"] else "")
        lines.append(f"| {name} | {worst['margin']:.3f} | {where} | {len(by_file[name])} |")
    overall = max((r["margin"] for r in records), default=math.nan)
    lines.append(f"\n{len(records)} assertions in {len(by_file)} files; worst margin {overall:.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="JSON-lines files written with FB_MARGINS")
    parser.add_argument("--top", type=int, default=0, help="also list the N worst assertions")
    args = parser.parse_args(argv)
    for path in args.paths:
        records = load(path)
        print(f"## {path}\n\n{table(records)}\n")
        for r in sorted(records, key=lambda r: -r["margin"])[: args.top]:
            print(f"{r['margin']:.3f}  {r['measured']:.3g} / {r['bound']:.3g}  {r['test']}  {r['what']}")


if __name__ == "__main__":
    main()
