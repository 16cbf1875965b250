"""Resumable sweeps: map_dataset whose per-chunk results are written to a directory as they are
computed, so that a run interrupted (preempted, killed, a rank that failed) and started again
computes only the chunks it had not finished, and gathers the same result.

Layout: ``directory/sweep.json`` (what the sweep is: n, chunk_size, a digest of the data, and the
caller's ``key`` naming the model and function) and ``directory/chunk_{c:06d}.pt`` per finished
chunk, each written to a temporary name and renamed (atomic on POSIX), so a chunk file is either
whole or absent. A directory holding another sweep is refused, not silently mixed in. Chunks are
global (data_parallel.chunk_ranges), so a restart may use another number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import optree
import torch

from .data_parallel import Data, _all_gather_object, _as_tuple, chunk_ranges, dataset_rows, gather_chunks, rank_and_world, rank_chunks, take


class SweepResult(NamedTuple):
    value: Any  # what map_dataset returns (None on ranks other than dst)
    computed: int  # chunks this rank computed in this run
    reused: int  # chunks this rank found finished on disk


def data_digest(data: Data) -> str:
    """sha256 over the dataset's tensors (dtype, shape, bytes): a restart must see the same data."""
    digest = hashlib.sha256()
    for tensor in _as_tuple(data):
        if tensor is None:
            digest.update(b"none")
            continue
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resumable_map_dataset(
    fn: Callable[..., Any],
    data: Data,
    directory: str | os.PathLike,
    *,
    chunk_size: int,
    key: str = "",
    strided: bool = False,
    combine: str = "rows",
    dst: int | None = 0,
) -> SweepResult:
    """map_dataset(fn, data, chunk_size=..., ...) that keeps each finished chunk's result in
    ``directory`` and reuses it on a later run of the same sweep (same data, chunk_size and key;
    another is refused). ``key`` should name what fn computes (model, metric): the directory
    cannot see the function. Ranks share the directory (one filesystem)."""
    rank, world = rank_and_world()
    n = dataset_rows(data)
    chunks = chunk_ranges(n, chunk_size, world)
    directory = Path(directory)
    manifest = {"n": n, "chunk_size": chunk_size, "data_sha256": data_digest(data), "key": key}
    refusal = _claim(directory, manifest) if rank == 0 else None
    refusal = _all_gather_object(refusal)[0]  # every rank raises rank 0's refusal, none waits
    if refusal is None and rank != 0:
        refusal = _claim(directory, manifest)
    if refusal is not None:
        raise ValueError(refusal)
    results, computed, reused = {}, 0, 0
    for c in rank_chunks(len(chunks), rank, world, strided):
        path = directory / f"chunk_{c:06d}.pt"
        if path.exists():
            results[c] = torch.load(path, weights_only=True)
            reused += 1
            continue
        results[c] = fn(*take(data, chunks[c]))
        temporary = path.with_name(f".{path.name}.{rank}.tmp")
        torch.save(_cpu(results[c]), temporary)
        os.replace(temporary, path)  # whole or absent
        computed += 1
    value = gather_chunks(results, chunks, strided=strided, combine=combine, dst=dst)
    return SweepResult(value, computed, reused)


def _claim(directory: Path, manifest: dict) -> str | None:
    """Create the sweep's directory and manifest, or check that it holds this very sweep: None,
    or why the directory is refused."""
    path = directory / "sweep.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != manifest:
            differ = [k for k in manifest if found.get(k) != manifest[k]]
            return f"{directory} holds another sweep (it differs in {', '.join(differ)}); use a new directory"
        return None
    if rank_and_world()[0] != 0:
        return f"{directory} has no sweep.json: rank 0 did not create it (not one shared filesystem?)"
    directory.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(".sweep.json.tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, path)
    return None


def _cpu(tree):
    return optree.tree_map(lambda leaf: leaf.detach().cpu() if isinstance(leaf, torch.Tensor) else leaf, tree)

