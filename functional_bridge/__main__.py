"""python -m functional_bridge [demo] [options] | python -m functional_bridge tour [--seed N]

The main job (the default, also `demo`): build a 2-layer Llama locally, train it through the
bridge on repeated random sequences, and find its induction heads; offline, under a minute on
two CPU cores. `tour`: a short tour of the one-pytree bridge on a GPT-2 built locally.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# --- Threads: the main job's choice, and why ------------------------------------------------
# The demo's model is tiny (d_model 64, about a thousand tokens a step), so each op runs for
# microseconds and a second OpenMP thread costs as much in fork/join as it saves. Measured on a
# 2-core AMD EPYC (300 steps each): one thread 37 steps/s, and 30 with a busy process beside it;
# two threads with OpenMP's default spin-waiting 35, but 8 beside a busy process (the second
# thread spins for a core it cannot get); two with PASSIVE waiting 15, and 11 when busy. So one
# thread by default (larger machines not measured). `--threads N` overrides it; so does an
# OMP_NUM_THREADS the user exported (we never overwrite the user's settings).
DEFAULT_THREADS = 1
# With more than one thread, OpenMP's idle workers sleep instead of spinning (PASSIVE), so they
# give a busy machine's cores back (slower when quiet, as above, but no collapse). The OpenMP runtime reads OMP_WAIT_POLICY once, when torch
# loads it; `python -m functional_bridge` has imported torch (through the package's __init__)
# before this file runs, so the policy is set here and, when it matters (more than one thread),
# the process restarts itself once so the runtime sees it. A user-set OMP_WAIT_POLICY is kept.
WAIT_POLICY = "PASSIVE"


def thread_plan(requested: int | None, environ) -> tuple[int | None, dict[str, str]]:
    """(the thread count to set, or None to keep the user's OMP_NUM_THREADS; the environment
    variables to add). Explicit `--threads` wins; then the user's OMP_NUM_THREADS; then the
    default. Variables the user set are never overwritten (except OMP_NUM_THREADS by --threads)."""
    env = {} if environ.get("OMP_WAIT_POLICY") else {"OMP_WAIT_POLICY": WAIT_POLICY}
    if requested is None and environ.get("OMP_NUM_THREADS"):
        return None, env
    threads = DEFAULT_THREADS if requested is None else requested
    return threads, {**env, "OMP_NUM_THREADS": str(threads)}


def apply_threads(requested: int | None, argv: list[str], restart: bool = False, environ=os.environ) -> int:
    """Set the threads (and wait policy) for this process; returns the thread count in use.
    With `restart` (the command line, not a library call), a process whose OpenMP runtime started
    without the wait policy and that will run more than one thread restarts itself once."""
    import torch

    threads, env = thread_plan(requested, environ)
    environ.update(env)
    count = threads if threads is not None else torch.get_num_threads()
    if restart and "OMP_WAIT_POLICY" in env and count > 1 and os.name == "posix":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "functional_bridge", *argv])
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# --- The command line ----------------------------------------------------------------------
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
    """The main job's parser: its options are the top level's, so --help lists them."""
    from .demo.train import TrainSettings

    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m functional_bridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s [demo] [options]\n       %(prog)s tour [--seed N]",
    )  # fmt: skip
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps,
                        help=f"training steps (default {defaults.steps})")
    parser.add_argument("--seed", type=_seed, default=0, help="seed for init and data (default 0)")
    parser.add_argument("--out", type=_directory, default=None,
                        help="folder for figures.json and induction_head.png (default: a fresh fb-demo-<time> folder here)")
    parser.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help=f"CPU threads (default {DEFAULT_THREADS}, or OMP_NUM_THREADS if set: "
                        "this model is too small to gain from more)")
    parser.add_argument("--save", type=_directory, default=None, help="also save the trained model here, HF format")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    return parser  # fmt: skip


def build_tour_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m functional_bridge tour",
                                     description="A short tour of the one-pytree bridge on a GPT-2 built locally.")
    parser.add_argument("--seed", type=_seed, default=0)
    return parser


def main(argv=None, restart: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tour"]:
        from .tour import run_tour

        run_tour(seed=build_tour_parser().parse_args(argv[1:]).seed)
        return 0
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["demo"] else argv)
    threads = apply_threads(args.threads, argv, restart=restart)
    from .demo.run import DemoSettings, run_demo
    from .demo.train import TrainSettings

    settings = DemoSettings(
        train=TrainSettings(steps=args.steps, seed=args.seed),
        out=args.out, device=args.device, save=args.save, progress=not args.no_progress, threads=threads,
    )  # fmt: skip
    run_demo(settings)
    return 0


def exit_now(code: int) -> None:
    """End the command without the interpreter's teardown: unloading torch and transformers took
    2.5-3.5 s of a 46 s run on a 2-core AMD EPYC (from the last progress line to the process's
    exit; 6-7 s on a loaded machine), time the user waits for nothing. Every file the job writes
    is closed by then; the streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(restart=True))
