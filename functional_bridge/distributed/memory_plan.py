"""Memory on paper: what a Llama-shaped model needs per rank under FSDP2 (bridge leaves sharded
over ``world_size`` ranks, one block gathered at a time), for analysis or for training, and what a
``run_with_cache`` of one layer keeps. Closed forms, checked by the tests against a real bridge's
parameter count and a real cache's bytes at a tiny size; the README's 70B plan is this module's
output for LLAMA_3_70B on 8 ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9


@dataclass(frozen=True)
class LlamaDims:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    tied: bool = False  # the head shares the embedding's leaf


LLAMA_3_70B = LlamaDims(d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_head=128, d_mlp=28672, d_vocab=128256)


def dims_of(cfg, tied: bool) -> LlamaDims:
    """The dims of a bridge's BridgeConfig (a Llama-family model: no biases, RMSNorm, gated MLP)."""
    return LlamaDims(cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, tied)


def parameter_counts(dims: LlamaDims) -> dict[str, int]:
    """Leaf element counts: the embedding, one block (q, k, v, o; gate, up, down; two norms), all
    blocks, the final norm, the head (0 when tied), the total."""
    d, kv = dims.d_model, dims.n_kv_heads * dims.d_head
    attention = d * dims.n_heads * dims.d_head * 2 + d * kv * 2  # W_Q, W_O; W_K, W_V
    block = attention + 3 * d * dims.d_mlp + 2 * d
    counts = {"embedding": dims.d_vocab * d, "block": block, "blocks": dims.n_layers * block, "final norm": d,
              "head": 0 if dims.tied else dims.d_vocab * d}  # fmt: skip
    counts["total"] = counts["embedding"] + counts["blocks"] + counts["final norm"] + counts["head"]
    return counts


def one_layer_cache_bytes(dims: LlamaDims, batch: int, pos: int, act_bytes: int = 2) -> int:
    """Bytes of ``run_with_cache`` over every hook of one Llama block, activations in a dtype of
    act_bytes bytes: per token seven d_model-wide activations (resid_pre, ln1 and ln2 normalized,
    attn_out, resid_mid, mlp_out, resid_post), q, rot_q and z over the query heads, k, rot_k and v
    over the key-value heads, three d_mlp-wide (pre, pre_linear, post) and two float32 norm scales;
    per head and query-key pair the float32 scores and the pattern (scores are float32 whatever the
    dtype: DESIGN.md's contract 3)."""
    per_token = act_bytes * (7 * dims.d_model + 3 * dims.n_heads * dims.d_head + 3 * dims.n_kv_heads * dims.d_head + 3 * dims.d_mlp) + 2 * 4
    per_pair = dims.n_heads * (4 + act_bytes)
    return batch * pos * per_token + batch * pos * pos * per_pair


def fsdp_memory_plan(
    dims: LlamaDims,
    world_size: int,
    *,
    batch: int = 1,
    pos: int = 4096,
    param_bytes: int = 2,
    training: bool = False,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
    gathered_blocks: int = 2,
) -> dict[str, int]:
    """Bytes per rank under FSDP2 (bridge leaves sharded over world_size ranks; fsdp.py's grouping:
    one group per block, the embedding, final norm and head as the root group):

    - sharded parameters: total * param_bytes / world_size
    - gathered blocks: ``gathered_blocks`` whole blocks at once (the one running and the one FSDP2
      prefetches), and the root group, gathered for the whole call
    - training only: sharded gradients (grad_bytes each) and optimizer state (optimizer_bytes per
      parameter: AdamW with float32 master weights, m and v is 12)
    - the cache of one layer (one_layer_cache_bytes at batch x pos), on the rank that asks for it
    """
    counts = parameter_counts(dims)
    plan = {
        "parameters (sharded)": -(-counts["total"] * param_bytes // world_size),
        "gathered blocks": gathered_blocks * counts["block"] * param_bytes,
        "gathered root group": (counts["embedding"] + counts["head"] + counts["final norm"]) * param_bytes,
        "gradients (sharded)": -(-counts["total"] * grad_bytes // world_size) if training else 0,
        "optimizer state (sharded)": -(-counts["total"] * optimizer_bytes // world_size) if training else 0,
        "run_with_cache of one layer": one_layer_cache_bytes(dims, batch, pos, param_bytes),
    }
    plan["total"] = sum(plan.values())
    return plan
