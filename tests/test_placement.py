"""Placement by layer (functional_bridge.placement): leaves on several devices, whole blocks at a
time, as HF's device_map="auto" leaves them. On CPU the second device is "meta": the forward must
carry the residual stream (and masks, rotary tables, gradients) to each block's device, which the
hooks record; a map onto one device is the plain forward, bit for bit; splitting a block is refused
by name. On a GPU machine, tests/test_cuda.py-style checks of cuda + cpu maps against the plain
forward are the numeric oracle (run when a session is lent one)."""

from __future__ import annotations

import pytest
import torch

import functional_bridge as fb
from functional_bridge.placement import device_map_by_layer, input_device, layer_placement, place_leaves
from helpers import make_gpt2
from tiny_models import tiny_model

META = torch.device("meta")
CPU = torch.device("cpu")


def untied(architecture):
    model = make_gpt2(seed=2, tie_word_embeddings=False) if architecture == "GPT2LMHeadModel" else tiny_model(architecture, seed=2, tie_word_embeddings=False)
    bridge = fb.Bridge.from_hf(model)
    assert len(bridge.params) == len(list(model.parameters()))  # the head is a leaf of its own
    return bridge


def record_devices(params, cfg, tokens, mask=None):
    seen = {}

    def note(x, hook):
        seen[hook.name] = x.device

    wanted = lambda name: name.endswith(("hook_resid_pre", "attn.hook_pattern", "hook_rot_q")) or name in ("hook_embed", "unembed.hook_in")  # noqa: E731
    logits = fb.forward(params, tokens, cfg, attention_mask=mask, hooks=[(wanted, note)])
    return logits, seen


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM", "Gemma2ForCausalLM"])
def test_the_residual_stream_follows_each_block(architecture):
    bridge = untied(architecture)
    cfg, n = bridge.cfg, bridge.cfg.n_layers
    tokens = torch.randint(0, cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0  # left padding: the padding mask moves too
    device_map = device_map_by_layer(bridge.params, cfg, ["cpu"] * (n - 1) + ["meta"], unembed="meta")
    placed = place_leaves(bridge.params, device_map)
    assert layer_placement(placed, cfg) == (CPU, [CPU] * (n - 1) + [META], META)
    assert input_device(placed, cfg) == CPU
    logits, seen = record_devices(placed, cfg, tokens, mask)
    assert logits.device == META and logits.shape == (2, 6, cfg.d_vocab_out)
    assert seen["hook_embed"] == CPU and seen["unembed.hook_in"] == META
    for layer in range(n):
        want = META if layer == n - 1 else CPU
        assert seen[f"blocks.{layer}.hook_resid_pre"] == want and seen[f"blocks.{layer}.attn.hook_pattern"] == want
        if cfg.positional_embedding_type == "rotary":
            assert seen[f"blocks.{layer}.attn.hook_rot_q"] == want


def test_placed_forward_composes_with_vmap_and_grad_on_the_far_device():
    """meta holds no data to copy back, so gradients are taken of the meta-placed leaves only."""
    bridge = untied("LlamaForCausalLM")
    cfg = bridge.cfg
    placed = fb.func.detached(place_leaves(bridge.params, device_map_by_layer(bridge.params, cfg, ["cpu", "meta"])))
    tokens = torch.randint(0, cfg.d_vocab, (3, 5), generator=torch.Generator().manual_seed(1))
    rows = torch.func.vmap(lambda row: fb.forward(placed, row[None], cfg)[0])(tokens)
    assert rows.device == META and rows.shape == (3, 5, cfg.d_vocab_out)
    far = {name: leaf for name, leaf in placed.items() if leaf.device == META}
    assert far and all(name.startswith(("model.layers.1.", "model.norm", "lm_head")) for name in far)
    grads = torch.func.grad(lambda f: fb.forward({**placed, **f}, tokens, cfg).float().sum())(far)
    assert set(grads) == set(far) and all(g.device == META and g.shape == far[n].shape for n, g in grads.items())


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_a_map_onto_one_device_is_the_plain_forward(architecture):
    bridge = fb.Bridge.from_hf(tiny_model(architecture, seed=3))  # GPT-2 tied here
    cfg = bridge.cfg
    tokens = torch.randint(0, cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(2))
    device_map = device_map_by_layer(bridge.params, cfg, ["cpu", "cpu"])
    assert set(device_map) == set(bridge.params)
    placed = place_leaves(bridge.params, device_map)
    assert all(placed[name] is leaf for name, leaf in bridge.params.items())  # nothing moved, nothing copied
    assert torch.equal(fb.forward(placed, tokens, cfg), fb.forward(bridge.params, tokens, cfg))


def test_a_tied_head_stays_with_the_embedding():
    bridge = fb.Bridge.from_hf(make_gpt2(seed=0))
    device_map = device_map_by_layer(bridge.params, bridge.cfg, ["cpu", "meta"])
    assert device_map["transformer.wte.weight"] == device_map["transformer.ln_f.weight"] == "cpu"
    assert device_map["transformer.h.2.mlp.c_fc.weight"] == "meta"
    with pytest.raises(ValueError, match="tied to the embedding"):
        device_map_by_layer(bridge.params, bridge.cfg, ["cpu", "meta"], unembed="meta")


def test_a_block_split_over_devices_is_refused_by_name():
    bridge = untied("LlamaForCausalLM")
    split = place_leaves(bridge.params, {"": "cpu", "model.layers.1.mlp": "meta"})
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mixed devices: .*meta \(e\.g\. model\.layers\.1\.mlp\.\w+_proj\.weight\), within block 1"):
        fb.forward(split, tokens, bridge.cfg)
    with pytest.raises(ValueError, match="within block 1"):
        fb.Bridge(split, bridge.cfg)
    with pytest.raises(ValueError, match="device_map places no prefix"):
        place_leaves(bridge.params, {"model.layers": "cpu"})


def test_a_bridge_over_placed_leaves_runs_and_reports_the_input_device():
    source = untied("LlamaForCausalLM")
    placed = place_leaves(source.params, device_map_by_layer(source.params, source.cfg, ["cpu", "meta"]))
    bridge = fb.Bridge(placed, source.cfg)
    assert bridge.device == CPU and bridge.cfg.device == CPU
    logits = bridge(torch.zeros(1, 4, dtype=torch.long))
    assert logits.device == META and logits.shape == (1, 4, source.cfg.d_vocab_out)


@pytest.mark.cuda
@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "LlamaForCausalLM"])
def test_cuda_and_cpu_placement_equals_one_device(device, architecture):
    """Blocks split between the GPU and the CPU (the head with the last block, or tied with the
    embedding on the GPU): logits and gradients as the all-CPU run, within float32 rounding over
    the depth (the GPU's kernels round otherwise). FB_CUDA_TESTS_DEVICE=cpu: a dry run."""
    from tolerance import assert_rounding_close, forward_depth

    torch.backends.cuda.matmul.allow_tf32 = False
    bridge = fb.Bridge.from_hf(make_gpt2(seed=4) if architecture == "GPT2LMHeadModel" else tiny_model(architecture, seed=4))
    cfg, params = bridge.cfg, fb.func.detached(bridge.params)
    tokens = torch.randint(0, cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    placed = place_leaves(params, device_map_by_layer(params, cfg, [device, "cpu"]))
    assert input_device(placed, cfg).type == device.type
    logits = fb.forward(placed, tokens.to(device), cfg, attention_mask=mask.to(device))
    expected = fb.forward(params, tokens, cfg, attention_mask=mask)
    assert_rounding_close(logits.cpu(), expected, n=forward_depth(cfg, 9), what="logits")
    loss = lambda p, t, m: fb.next_token_loss(fb.forward(p, t, cfg, attention_mask=m), t, m)  # noqa: E731
    grads = torch.func.grad(loss)(placed, tokens.to(device), mask.to(device))
    reference = torch.func.grad(loss)(params, tokens, mask)
    scale = max(g.abs().max().item() for g in reference.values())
    for name, value in grads.items():
        assert value.device == placed[name].device
        assert_rounding_close(value.cpu(), reference[name], n=2 * forward_depth(cfg, 9), scale=scale, what=name)
