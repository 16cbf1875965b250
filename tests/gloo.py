"""Run a function on N CPU processes joined by a gloo process group, for the distributed tests.

``run_on_ranks(fn, world_size=2, args=(...))`` starts ``world_size`` processes; each joins
one gloo group (through a rendezvous file in a fresh temporary directory), runs
``fn(rank, world_size, *args)`` with one torch thread, and sends back what it returned (anything
picklable: tensors, dicts). The list of results comes back in rank order. A rank that raises
makes the call raise with that rank's traceback; a run past ``timeout`` seconds is killed and
raises ``TimeoutError``. ``fn`` must be importable by name (a module-level function).
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import tempfile
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# The ranks fork from one server process per caller that imported these once (multiprocessing's
# forkserver), rather than each importing torch and transformers afresh (spawn): ~5-10 s of
# importing per process on a 2-core machine, paid once instead of at every run. The server has
# run no OpenMP region or thread of torch's, so forking it is safe; spawn where there is no fork.
PRELOAD = ["torch", "torch.distributed", "transformers", "functional_bridge", "functional_bridge.distributed"]


def _context():
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts (the first run)
    return context


def run_on_ranks(fn: Callable[..., Any], world_size: int = 2, args: Sequence[Any] = (), timeout: float = 120.0) -> list[Any]:
    context = _context()
    results = context.Queue()
    with tempfile.TemporaryDirectory() as directory:
        rendezvous = "file://" + os.path.join(directory, "rendezvous")
        processes = [
            context.Process(target=_rank_main, args=(fn, rank, world_size, tuple(args), rendezvous, results), daemon=True)
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        try:
            outcomes = _collect(results, world_size, timeout, processes)
        finally:
            for process in processes:
                process.join(timeout=5)
                if process.is_alive():
                    process.kill()
    failures = [(rank, text) for rank, (ok, text) in sorted(outcomes.items()) if not ok]
    if failures:
        raise RuntimeError("\n".join(f"rank {rank} failed:\n{text}" for rank, text in failures))
    return [outcomes[rank][1] for rank in range(world_size)]


def _collect(results, world_size: int, timeout: float, processes) -> dict[int, tuple[bool, Any]]:
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcomes) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"distributed run: {world_size - len(outcomes)} of {world_size} ranks not done after {timeout} s")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead and len(outcomes) < world_size:
                missing = sorted(set(range(world_size)) - set(outcomes))
                # a rank that died without reporting (killed, segfault) fails the run now, not at the timeout
                if any(processes[r].exitcode not in (None, 0) for r in missing):
                    raise RuntimeError(f"distributed run: ranks {missing} exited ({[processes[r].exitcode for r in missing]}) without a result")
            continue
        outcomes[rank] = (ok, pickle.loads(value) if ok else value)
    return outcomes


def _rank_main(fn, rank: int, world_size: int, args: tuple, rendezvous: str, results) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle bytes: a tensor sent through torch's queue shares memory with a process about to exit
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - the parent reports every rank's failure by its traceback
        results.put((rank, False, traceback.format_exc()))
