"""Beyond one process on torch.distributed: data-parallel analysis over a dataset of prompts
(data_parallel, analysis) and resumable sweeps (sweep). Placement of one model's blocks over
several devices is functional_bridge.placement (the forward's own)."""

from .analysis import attribution_scores, cached_activations, example_grads, last_token, mean_over_tokens, patching_scores
from .data_parallel import chunk_ranges, map_dataset, rank_and_world, rank_chunks
from .sweep import SweepResult, resumable_map_dataset

__all__ = [
    "SweepResult",
    "attribution_scores",
    "cached_activations",
    "chunk_ranges",
    "example_grads",
    "last_token",
    "map_dataset",
    "mean_over_tokens",
    "patching_scores",
    "rank_and_world",
    "rank_chunks",
    "resumable_map_dataset",
]
