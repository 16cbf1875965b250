"""Data-parallel analysis: a dataset of rows (tokens [n, pos], an optional mask, any per-example
tensors with the same leading n) cut into chunks, the chunks dealt to the ranks of a
torch.distributed group, a function run on each chunk, and the results gathered back in the
dataset's order, to one rank or to all.

The chunking is global: chunk c holds rows ``[c * chunk_size, (c + 1) * chunk_size)`` whatever the
number of ranks, so a chunk's computation is the same on 1 rank or N (same batch, same kernels):
results gathered over N ranks equal one process's bit for bit (at one thread count). Without
chunk_size, each rank's shard is one chunk (shards differ by at most one row). Ranks get
contiguous runs of chunks, or every world_size-th chunk (``strided=True``); n need not divide.

Nothing here needs an initialised process group: without one, the code runs as rank 0 of 1, so
one script serves one process and N (``torchrun``). Results are gathered on CPU (through the
rank's GPU under NCCL), after one ``all_gather_object`` of shapes so that a rank with no rows
takes part.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import optree
import torch
import torch.distributed as dist
from torch import Tensor

Data = Tensor | Sequence["Tensor | None"]  # one tensor, or several with one leading n (None passes through)


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _as_tuple(data: Data) -> tuple[Tensor | None, ...]:
    return (data,) if isinstance(data, Tensor) else tuple(data)


def dataset_rows(data: Data) -> int:
    """The shared leading size n of the dataset's tensors; a clear error if they disagree."""
    tensors = [t for t in _as_tuple(data) if t is not None]
    if not tensors:
        raise ValueError("the dataset holds no tensor")
    sizes = {tuple(t.shape[:1]) for t in tensors}
    if len(sizes) != 1 or () in sizes:
        raise ValueError(f"every dataset tensor needs the same leading number of rows, got shapes {[tuple(t.shape) for t in tensors]}")
    return tensors[0].shape[0]


def balanced(n: int, parts: int, part: int) -> range:
    """Part ``part`` of range(n) cut into ``parts`` contiguous runs whose sizes differ by at most one
    (the first n % parts runs get the extra)."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return range(start, start + base + (part < extra))


def chunk_ranges(n: int, chunk_size: int | None, world_size: int) -> list[range]:
    """The dataset's chunks, in order: rows of chunk c. chunk_size None: one balanced shard per rank."""
    if chunk_size is None:
        return [balanced(n, world_size, rank) for rank in range(world_size)]
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return [range(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def rank_chunks(n_chunks: int, rank: int, world_size: int, strided: bool = False) -> list[int]:
    """The chunk ids rank ``rank`` computes: a balanced contiguous run, or every world_size-th."""
    return list(range(rank, n_chunks, world_size)) if strided else list(balanced(n_chunks, world_size, rank))


def take(data: Data, rows: range) -> tuple[Tensor | None, ...]:
    """The dataset's tensors at rows (a contiguous slice: views, no copy)."""
    return tuple(None if t is None else t[rows.start : rows.stop] for t in _as_tuple(data))


def map_dataset(
    fn: Callable[..., Any],
    data: Data,
    *,
    chunk_size: int | None = None,
    strided: bool = False,
    combine: str = "rows",
    dst: int | None = 0,
) -> Any:
    """Run ``fn(*chunk_tensors)`` on this rank's chunks and gather. fn returns a pytree of tensors.

    combine="rows": each leaf has a leading dim of the chunk's rows; the result has the
    dataset's n rows in its order. combine="sum": leaves of any shape, summed over chunks (each
    rank in chunk order, then the ranks' partial sums in rank order: deterministic). dst: the
    rank that receives the result (the others get None); None: every rank gets it."""
    rank, world = rank_and_world()
    n = dataset_rows(data)
    chunks = chunk_ranges(n, chunk_size, world)
    mine = rank_chunks(len(chunks), rank, world, strided)
    return gather_chunks({c: fn(*take(data, chunks[c])) for c in mine}, chunks, strided=strided, combine=combine, dst=dst)


def gather_chunks(results: dict[int, Any], chunks: list[range], *, strided: bool, combine: str, dst: int | None) -> Any:
    """Gather per-chunk results (this rank's: chunk id -> pytree) as map_dataset says."""
    if combine not in ("rows", "sum"):
        raise ValueError(f"combine must be 'rows' or 'sum', got {combine!r}")
    rank, world = rank_and_world()
    if dst is not None and not 0 <= dst < world:
        raise ValueError(f"dst must be a rank in [0, {world}) or None, got {dst}")
    mine = sorted(results)
    if combine == "sum":
        local = _sum([results[c] for c in mine])
    else:
        local = _concat_rows([results[c] for c in mine], [len(chunks[c]) for c in mine])
    skeletons = _all_gather_object(None if local is None else _skeleton(local))
    skeleton = next((s for s in skeletons if s is not None), None)
    if skeleton is None:
        raise ValueError("no rank computed any chunk: the dataset is empty")
    treespec, specs = skeleton
    if combine == "sum":
        zeros = [torch.zeros((1, *shape), dtype=dtype) for shape, dtype in specs]  # a rank without chunks
        leaves = zeros if local is None else optree.tree_leaves(local)
        parts = [_collect(leaf, dst) for leaf in leaves]  # per leaf: each rank's partial sum, in rank order
        if dst is not None and rank != dst:
            return None
        totals = [_sum_in_order([p for p, s in zip(per_rank, skeletons) if s is not None]) for per_rank in parts]
        return optree.tree_unflatten(treespec, totals)
    counts = [sum(len(chunks[c]) for c in rank_chunks(len(chunks), r, world, strided)) for r in range(world)]
    order = torch.tensor([row for r in range(world) for c in rank_chunks(len(chunks), r, world, strided) for row in chunks[c]], dtype=torch.long)
    width = max(counts)
    local_leaves = [torch.zeros((0, *shape), dtype=dtype) for shape, dtype in specs] if local is None else optree.tree_leaves(local)
    gathered = []
    for leaf, (shape, dtype) in zip(local_leaves, specs):
        padded = torch.zeros((width, *shape), dtype=dtype)  # one shape on every rank, for the collective
        padded[: leaf.shape[0]] = leaf.detach().cpu()
        per_rank = _collect(padded, dst)
        if per_rank is None:  # not the receiving rank
            continue
        stacked = torch.cat([part[:count] for part, count in zip(per_rank, counts)])  # rows in rank-then-chunk order
        out = torch.empty_like(stacked)
        out[order] = stacked  # back to the dataset's order
        gathered.append(out)
    return optree.tree_unflatten(treespec, gathered) if dst is None or rank == dst else None


def _skeleton(tree) -> tuple[Any, list[tuple[tuple[int, ...], torch.dtype]]]:
    leaves, treespec = optree.tree_flatten(tree)
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"the per-chunk function must return tensors (a pytree of them), got a {type(leaf).__name__}")
    return treespec, [(tuple(leaf.shape[1:]), leaf.dtype) for leaf in leaves]


def _concat_rows(parts: list, sizes: list[int]):
    if not parts:
        return None
    for part, size in zip(parts, sizes):
        for leaf in optree.tree_leaves(part):
            if not isinstance(leaf, Tensor) or leaf.dim() == 0 or leaf.shape[0] != size:
                got = tuple(leaf.shape) if isinstance(leaf, Tensor) else type(leaf).__name__
                raise ValueError(f"combine='rows' needs each result leaf to lead with the chunk's {size} rows, got {got}")
    return optree.tree_map(lambda *leaves: torch.cat([leaf.detach().cpu() for leaf in leaves]), *parts)


def _sum(parts: list):
    if not parts:
        return None
    total = optree.tree_map(lambda leaf: leaf.detach().cpu().clone(), parts[0])
    for part in parts[1:]:
        total = optree.tree_map(lambda a, b: a + b.detach().cpu(), total, part)
    # a sum's skeleton keeps the whole shape: prepend a dim that _skeleton drops
    return optree.tree_map(lambda leaf: leaf[None], total)


def _sum_in_order(partials: list[Tensor]) -> Tensor:
    total = partials[0][0]
    for part in partials[1:]:
        total = total + part[0]
    return total


def _all_gather_object(obj) -> list:
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _collect(tensor: Tensor, dst: int | None) -> list[Tensor] | None:
    """Every rank's tensor (one shape), in rank order: on dst only (None elsewhere), or on all."""
    rank, world = rank_and_world()
    if world == 1:
        return [tensor]
    tensor = tensor.to(_comm_device()).contiguous()
    if dst is None:
        out = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(out, tensor)
    else:
        out = [torch.empty_like(tensor) for _ in range(world)] if rank == dst else None
        dist.gather(tensor, out, dst=dst)
    return None if out is None else [part.cpu() for part in out]


def _comm_device() -> torch.device:
    """Where the group's collectives take tensors: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
