"""Beyond one process, on torch.distributed's own engine.

fsdp.py: FSDP2 (``fully_shard``) over a bridge's per-block containers, every leaf a DTensor
shard, one block gathered at a time; gathering whole leaves back (``full_params``,
``gathered_bridge``, ``export_hf``). checkpoint.py: ``torch.distributed.checkpoint`` with HF keys.
data_parallel.py, analysis.py: a dataset of prompts split over ranks (caching, per-example
gradients, patching and attribution sweeps), gathered in order; sweep.py: resumable sweeps;
memory_plan.py: FSDP2 bytes per rank on paper. Placement of one model's blocks over several
devices is functional_bridge.placement (the forward's own).
"""

from .analysis import attribution_scores, cached_activations, example_grads, last_token, mean_over_tokens, patching_scores
from .checkpoint import load_checkpoint, save_checkpoint
from .data_parallel import chunk_ranges, map_dataset, rank_and_world, rank_chunks
from .fsdp import block_containers, export_hf, full_params, fully_shard_bridge, gathered_bridge, is_sharded
from .sweep import SweepResult, resumable_map_dataset

__all__ = [
    "SweepResult",
    "attribution_scores",
    "block_containers",
    "cached_activations",
    "chunk_ranges",
    "example_grads",
    "export_hf",
    "full_params",
    "fully_shard_bridge",
    "gathered_bridge",
    "is_sharded",
    "last_token",
    "load_checkpoint",
    "map_dataset",
    "mean_over_tokens",
    "patching_scores",
    "rank_and_world",
    "rank_chunks",
    "resumable_map_dataset",
    "save_checkpoint",
]
