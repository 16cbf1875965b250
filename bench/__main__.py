"""python -m bench: run the suites, write results.json, results.md (and chart.png).

    python -m bench [--suite NAME ...] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                    [--size tiny|small|medium] [--anchors] [--out DIR] [--repeats N] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from . import OMP_POLICY_SOURCE, allocator, suites
from .models import SIZES
from .report import write
from .runner import DTYPES, Context, Settings, run_suite

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv=None) -> tuple[Settings, Path]:
    parser = argparse.ArgumentParser(prog="python -m bench", description="functional_bridge benchmarks: ratios against HF in one process")
    parser.add_argument("--suite", action="extend", nargs="+", choices=suites.NAMES + ["all"], metavar="NAME",
                        help=f"suites to run (default: all): {', '.join(suites.NAMES)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--anchors", action="store_true", help="include TransformerLens's HookedTransformer")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results/<date-time>/)")
    parser.add_argument("--repeats", type=int, help="timed rounds per measurement (default 10, --quick 3)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds (default 2, --quick 1)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run or a short GPU session")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: os.cpu_count())")
    parser.add_argument("--shape", action="append", default=[], help="BxS, repeatable: override the forward/cache/compile shapes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for the compile suite")
    parser.add_argument("--malloc", default="retain", choices=allocator.MODES,
                        help="glibc malloc: retain freed memory (default) or glibc's defaults; see bench/allocator.py")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    names = suites.NAMES if not args.suite or "all" in args.suite else list(dict.fromkeys(args.suite))
    shapes = tuple(tuple(int(x) for x in s.lower().split("x")) for s in args.shape)
    settings = Settings(
        suites=names, device=args.device, dtype=args.dtype, size=args.size, anchors=args.anchors,
        repeats=args.repeats or (3 if args.quick else 10), warmup=args.warmup or (1 if args.quick else 2),
        quick=args.quick, threads=args.threads or os.cpu_count() or 1, shapes=shapes, seed=args.seed,
        compile_mode=args.compile_mode, malloc=args.malloc,
    )  # fmt: skip
    out = args.out or RESULTS / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return settings, out


def _git(*args: str) -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=root, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def meta(settings: Settings, argv) -> dict:
    import transformers

    from .anchors import tl_version

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv),
        "git commit": (_git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)" if _git("status", "--porcelain", "functional_bridge") else "")),
        "machine": f"{platform.machine()}, {_cpu_name()}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": tl_version() or "not installed",
        "torch threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": f"{os.environ.get('OMP_WAIT_POLICY', 'unset')} ({OMP_POLICY_SOURCE})",
        "malloc": settings.malloc_effect,
        "device": torch.cuda.get_device_name() if settings.device == "cuda" else "cpu",
        "dtype": settings.dtype,
        "size": f"{settings.size} ({', '.join(f'{k}={v}' for k, v in SIZES[settings.size].items())})",
        "rounds": f"{settings.repeats} timed (heavy suites: half, >= 3), {settings.warmup} warm-up",
        "anchors": settings.anchors,
    }  # fmt: skip
    if hasattr(os, "getloadavg"):
        info["load average at start (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings, out = parse(argv)
    settings.malloc_effect = allocator.apply(settings.malloc)
    torch.set_num_threads(settings.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    info = meta(settings, argv)
    ctx = Context(settings)
    results = []
    for name in settings.suites:
        print(f"[bench] {name} ...", flush=True)
        result = run_suite(ctx, name, suites.load(name))
        results.append(result)
        status = "ok" if result.status == "ok" else "ERROR " + (result.error or "").splitlines()[0]
        print(f"[bench] {name}: {status} ({result.seconds:.1f} s)", flush=True)
        for row in result.rows:
            if row.target:
                print(f"         {row.case:>14} {row.measure}: {row.value} {row.unit} target {row.target} met={row.met}", flush=True)
        if hasattr(os, "getloadavg"):
            info["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        paths = write(out, info, results)  # after every suite: a run cut short still leaves its results
    print(f"[bench] wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return {"paths": paths, "results": results, "meta": info}


if __name__ == "__main__":
    main()
