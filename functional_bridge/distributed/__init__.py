"""Beyond one process, on torch.distributed's own engine.

fsdp.py: FSDP2 (``fully_shard``) over a bridge's per-block containers, every leaf a DTensor
shard, one block gathered at a time; gathering whole leaves back (``full_params``,
``gathered_bridge``, ``export_hf``). checkpoint.py: ``torch.distributed.checkpoint`` with HF keys.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .fsdp import block_containers, export_hf, full_params, fully_shard_bridge, gathered_bridge, is_sharded

__all__ = [
    "block_containers",
    "export_hf",
    "full_params",
    "fully_shard_bridge",
    "gathered_bridge",
    "is_sharded",
    "load_checkpoint",
    "save_checkpoint",
]
