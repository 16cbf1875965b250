"""The FSDP2 memory plan (functional_bridge.distributed.memory_plan): its parameter count equals a
real Llama bridge's leaves, its one-layer cache bytes equal a real run_with_cache's (bf16 and
float32), and the README's 70B figures are closed-form arithmetic written out here."""

from __future__ import annotations

import pytest
import torch

import functional_bridge as fb
from functional_bridge.distributed.memory_plan import LLAMA_3_70B, dims_of, fsdp_memory_plan, one_layer_cache_bytes, parameter_counts
from tiny_models import tiny_model


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_equals_a_real_bridge(tied):
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM", tie_word_embeddings=tied))
    counts = parameter_counts(dims_of(bridge.cfg, tied))
    assert counts["total"] == sum(leaf.numel() for leaf in bridge.params.values())
    block = [leaf.numel() for name, leaf in bridge.params.items() if name.startswith("model.layers.1.")]
    assert counts["block"] == sum(block)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_layer_cache_bytes_equal_a_real_cache(dtype):
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM").to(dtype))
    batch, pos = 3, 7
    tokens = torch.zeros(batch, pos, dtype=torch.long)
    _, cache = fb.run_with_cache(bridge.params, tokens, bridge.cfg, names_filter=lambda name: name.startswith("blocks.1."))
    measured = sum(value.numel() * value.element_size() for value in cache.values())
    assert one_layer_cache_bytes(dims_of(bridge.cfg, False), batch, pos, act_bytes=torch.finfo(dtype).bits // 8) == measured


def test_the_70b_plan_is_the_closed_form():
    d, layers, heads, kv_heads, d_head, d_mlp, vocab = 8192, 80, 64, 8, 128, 28672, 128256
    block = 2 * d * heads * d_head + 2 * d * kv_heads * d_head + 3 * d * d_mlp + 2 * d
    total = 2 * vocab * d + layers * block + d
    assert total == 70_553_706_496  # Llama 3 70B's published 70.6B
    assert parameter_counts(LLAMA_3_70B)["total"] == total
    analysis = fsdp_memory_plan(LLAMA_3_70B, 8, batch=1, pos=4096)
    cache = 4096 * (2 * (7 * d + 3 * heads * d_head + 3 * kv_heads * d_head + 3 * d_mlp) + 8) + 4096**2 * heads * 6
    assert analysis == {
        "parameters (sharded)": total * 2 // 8,
        "gathered blocks": 2 * block * 2,
        "gathered root group": (2 * vocab * d + d) * 2,
        "gradients (sharded)": 0,
        "optimizer state (sharded)": 0,
        "run_with_cache of one layer": cache,
        "total": total * 2 // 8 + 4 * block + (2 * vocab * d + d) * 2 + cache,
    }
    assert analysis["total"] < 80e9  # analysis fits on each 80 GB GPU
    training = fsdp_memory_plan(LLAMA_3_70B, 8, training=True)
    assert training["gradients (sharded)"] == total * 2 // 8 and training["optimizer state (sharded)"] == total * 12 // 8
    assert training["total"] > 80e9  # AdamW with float32 states does not fit on 8 x 80 GB
