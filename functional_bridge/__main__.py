"""python -m functional_bridge [demo|tour] ...

demo (the default): train a small Llama through the bridge on repeated random sequences and
find its induction heads, offline, in about half a minute on two CPU cores.
tour: a short tour of the one-pytree bridge on a GPT-2 built locally.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

COMMANDS = ("demo", "tour")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _directory(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    return path


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"unsupported device type {device.type!r}: use cpu or cuda")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m functional_bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="train a small transformer and find its induction heads (default)")
    demo.add_argument("--steps", type=_positive_int, default=2000, help="training steps (default 2000)")
    demo.add_argument("--seed", type=_seed, default=0, help="seed for init and data (default 0)")
    demo.add_argument("--out", type=_directory, default=None, help="folder for figures.json and the PNG "
                      "(default: a fresh fb-demo-<time> folder here)")
    demo.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    demo.add_argument("--save", type=_directory, default=None, help="also save the trained model here, HF format")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    tour = commands.add_parser("tour", help="a short tour on a GPT-2 built locally")
    tour.add_argument("--seed", type=_seed, default=0)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv.insert(0, "demo")
    args = build_parser().parse_args(argv)
    if args.command == "tour":
        from .tour import run_tour

        run_tour(seed=args.seed)
        return 0
    from .demo.run import DemoSettings, run_demo
    from .demo.train import TrainSettings

    settings = DemoSettings(
        train=TrainSettings(steps=args.steps, seed=args.seed),
        out=args.out, device=args.device, save=args.save, progress=not args.no_progress,
    )  # fmt: skip
    run_demo(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
