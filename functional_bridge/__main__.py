"""python -m functional_bridge [tour] ...: the main job on a model built locally (no download)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m functional_bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    tour = commands.add_parser("tour", help="a short tour on a GPT-2 built locally (seconds on CPU)")
    tour.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from .tour import run_tour

    run_tour(seed=getattr(args, "seed", 0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
