"""FSDP2 over a bridge, on 2 gloo processes (CPU): sharded training, caching, DCP and export.

One spawn (tests/gloo.py) does the sharded work for one test (starting two processes costs more
than all the checks together); its check_* functions compare what the ranks sent back against
single-process oracles computed in this process:

- training through ``bridge.parameters()`` with SGD, 10 steps, each rank on half of the global
  batch, against one process on the whole batch, as accurate as that float32 run against its
  float64 twin (tests/tolerance.py);
- ``run_with_cache`` on the sharded bridge against the unsharded bridge (float64 twin alike);
- one block's leaves gathered at a time in forward (FSDP2's one-block prefetch in backward);
- parameter bytes per rank ~1/world, read from the local shards;
- ``tl_parameters()``, ``W_Q`` and the pure forward refusing shards by name;
- DCP checkpoints with HF keys, loaded into a fresh sharded bridge, into unsharded ones on the
  ranks and here (no process group): bitwise equal (loading copies);
- export to a plain HF model on rank 0: HF's own forward equal to the original HF model's;
- the README's "Scaling out" blocks, run in order on the 2 processes.
"""

from __future__ import annotations

import copy
import pathlib
import re
import traceback

import pytest
import torch

import functional_bridge as fb
from functional_bridge.params import ParamsStructureError, ShardedParamsError
from gloo import run_on_ranks
from tiny_models import tiny_model
from tolerance import assert_as_accurate_as, float64

WORLD = 2
ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM")  # tied and untied head, biases and GQA
STEPS, LR = 10, 0.5
BATCH, POS = 4, 8


def global_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, POS), generator=torch.Generator().manual_seed(3))  # [batch, pos]


def _unsharded_blocks(blocks) -> list[int]:
    """The layers whose container holds whole leaves right now (not DTensor shards)."""
    from torch.distributed.tensor import DTensor

    return [i for i, module in enumerate(blocks) if not any(isinstance(p, DTensor) for p in module.parameters())]


def _refusal(fn) -> str:
    try:
        fn()
    except ShardedParamsError as error:
        return str(error)
    return "no error"


def _sharded_run(rank: int, world: int, architecture: str, directory: str) -> dict:
    """On each rank: shard a bridge, check what only the ranks can see, train, cache, checkpoint."""
    from torch.distributed.tensor import DTensor

    from functional_bridge.distributed import block_containers, export_hf, full_params, fully_shard_bridge, gathered_bridge
    from functional_bridge.distributed import load_checkpoint, save_checkpoint

    out: dict = {}
    original = tiny_model(architecture)
    bridge = fully_shard_bridge(fb.Bridge.from_hf(copy.deepcopy(original)))
    out["all_shards"] = all(isinstance(leaf, DTensor) for leaf in bridge.params.values())
    out["local_bytes"] = sum(leaf.to_local().numel() * leaf.element_size() for leaf in bridge.params.values())
    out["row_bytes"] = sum(p[0].numel() * p.element_size() if p.dim() else 0 for p in original.parameters())
    out["refusals"] = {
        "tl_parameters": _refusal(bridge.tl_parameters),
        "W_Q": _refusal(lambda: bridge.W_Q),
        "fb.forward": _refusal(lambda: fb.forward(bridge.params, global_tokens(bridge.cfg.d_vocab), bridge.cfg)),
        "to_hf": _refusal(bridge.to_hf),
    }
    # ...and gathered, the TL views are the original's (gathering copies)
    whole, unsharded = gathered_bridge(bridge).tl_parameters(), fb.Bridge.from_hf(copy.deepcopy(original)).tl_parameters()
    out["gathered_tl_equal"] = list(whole) == list(unsharded) and all(torch.equal(whole[k], unsharded[k]) for k in whole)

    # export before training: HF's own forward of the gathered model equals the original's
    tokens = global_tokens(bridge.cfg.d_vocab)
    exported = export_hf(bridge, rank=0)
    if rank == 0:
        with torch.no_grad():
            out["export_logits_equal"] = torch.equal(exported(tokens).logits, original(tokens).logits)
        out["export_state_equal"] = all(torch.equal(v, original.state_dict()[k]) for k, v in exported.state_dict().items())

    # run_with_cache on the whole batch, on every rank
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=lambda name: "attn.hook_pattern" in name or "resid" in name)
    out["cache"] = {name: value.clone() for name, value in cache.items()}
    out["cache_logits"] = logits.clone()
    out["all_shards_after_cache"] = all(isinstance(leaf, DTensor) for leaf in bridge.params.values())  # the root too

    # training: this rank's half of the global batch; FSDP2 averages the gradients over ranks
    blocks = block_containers(bridge)
    seen: dict = {"fwd": [], "bwd": []}
    mids = [f"blocks.{layer}.hook_resid_mid" for layer in range(bridge.cfg.n_layers)]

    def recorder(direction):
        def hook(value, hook):
            seen[direction].append((int(hook.name.split(".")[1]), _unsharded_blocks(blocks)))
        return hook

    optimizer = torch.optim.SGD(bridge.parameters(), lr=LR)
    local = tokens.chunk(world)[rank]
    losses = []
    for step in range(STEPS):
        hooks = ([(n, recorder("fwd")) for n in mids], [(n, recorder("bwd")) for n in mids]) if step == 0 else ((), ())
        with bridge.hooks(*hooks):
            loss = bridge(local, return_type="loss")
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    out["losses"] = torch.stack(losses)
    out["seen"] = seen
    out["trained"] = full_params(bridge)
    out["all_shards_after"] = all(isinstance(leaf, DTensor) for leaf in bridge.params.values())

    # DCP: save the trained shards; load into a fresh sharded bridge and into an unsharded one
    save_checkpoint(bridge, directory)
    fresh = fully_shard_bridge(fb.Bridge.from_hf(tiny_model(architecture, seed=1)))
    load_checkpoint(fresh, directory)
    out["dcp_sharded_equal"] = all(torch.equal(v, out["trained"][k]) for k, v in full_params(fresh).items())
    plain = fb.Bridge.from_hf(tiny_model(architecture, seed=1))
    load_checkpoint(plain, directory)
    out["dcp_plain_equal"] = all(torch.equal(v.detach(), out["trained"][k]) for k, v in plain.params.items())
    exported = export_hf(bridge, rank=0)
    if rank == 0:
        out["export_trained_equal"] = all(torch.equal(v, out["trained"][k]) for k, v in fb.Bridge.from_hf(exported).params.items())
    return out


def readme_blocks() -> list[str]:
    """The python blocks of the README's "Scaling out" section, in order."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = re.search(r"\n## Scaling out\n.*?(?=\n## )", readme, flags=re.S).group(0)
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _readme_run(blocks: list[str]) -> dict:
    """Run the blocks in one namespace, as one script; what they left to check, or the traceback."""
    namespace: dict = {"__name__": "__readme__"}
    try:
        for index, block in enumerate(blocks):
            exec(compile(block, f"README.md 'Scaling out' block {index}", "exec"), namespace)
    except Exception:  # noqa: BLE001 - reported by the test, so that the other checks still report
        return {"error": traceback.format_exc()}
    return {"error": None, "local": namespace["local"], "W_Q": tuple(namespace["W_Q"].shape)}


def _all_runs(rank: int, world: int, directories: dict, blocks: list[str]) -> dict:
    out = {arch: _sharded_run(rank, world, arch, directories[arch]) for arch in ARCHITECTURES}
    out["readme"] = _readme_run(blocks)
    return out


def _run_ranks(tmp_path) -> tuple[dict, dict]:
    directories = {arch: str(tmp_path / f"dcp_{arch}") for arch in ARCHITECTURES}
    results = run_on_ranks(_all_runs, world_size=WORLD, args=(directories, readme_blocks()), timeout=300)
    by_arch = {arch: [r[arch] for r in results] for arch in ARCHITECTURES}
    by_arch["readme"] = [r["readme"] for r in results]
    return by_arch, directories


def check_readme_scaling_out_runs_on_two_processes(ranks):
    assert len(readme_blocks()) >= 2
    for rank, r in enumerate(ranks[0]["readme"]):
        assert r["error"] is None, f"rank {rank}:\n{r['error']}"
        assert r["W_Q"] == (2, 4, 32, 8)
    # GPT-2 with n_embd=32, n_layer=2, vocab 64, 32 positions: the ranks hold half each
    total = 64 * 32 + 32 * 32 + 2 * (2 * 32 + 32 * 96 + 96 + 32 * 32 + 32 + 2 * 32 + 32 * 128 + 128 + 128 * 32 + 32) + 2 * 32
    assert sum(r["local"] for r in ranks[0]["readme"]) == total


def _single_process_training(architecture: str, dtype: torch.dtype):
    """The oracle: one process, the whole global batch, SGD on bridge.parameters()."""
    bridge = fb.Bridge.from_hf(tiny_model(architecture).to(dtype))
    tokens = global_tokens(bridge.cfg.d_vocab)
    optimizer = torch.optim.SGD(bridge.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        loss = bridge(tokens, return_type="loss")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), {name: leaf.detach() for name, leaf in bridge.params.items()}


def check_fsdp_training_equals_one_process(ranks, architecture):
    results = ranks[0][architecture]
    losses32, trained32 = _single_process_training(architecture, torch.float32)
    losses64, trained64 = _single_process_training(architecture, torch.float64)
    # every rank holds the same gathered leaves; the global loss is the mean of the ranks' losses
    for r in results[1:]:
        assert all(torch.equal(r["trained"][k], v) for k, v in results[0]["trained"].items())
    assert_as_accurate_as(results[0]["trained"], trained32, trained64, what="FSDP2 SGD leaves after 10 steps")
    sharded_losses = torch.stack([r["losses"] for r in results]).mean(0)
    assert_as_accurate_as(sharded_losses, losses32, losses64, what="FSDP2 global loss per step")
    assert all(r["all_shards_after"] for r in results)


def check_sharded_run_with_cache_equals_unsharded(ranks, architecture):
    hf = tiny_model(architecture)
    names = lambda name: "attn.hook_pattern" in name or "resid" in name  # noqa: E731
    bridge, bridge64 = fb.Bridge.from_hf(hf), fb.Bridge.from_hf(copy.deepcopy(hf).double())
    tokens = global_tokens(bridge.cfg.d_vocab)
    with torch.no_grad():
        logits32, cache32 = bridge.run_with_cache(tokens, names_filter=names)
        logits64, cache64 = bridge64.run_with_cache(tokens, names_filter=names)
    for r in ranks[0][architecture]:
        assert list(r["cache"]) == list(cache32)
        assert_as_accurate_as(dict(r["cache"]), dict(cache32), dict(cache64), per_key_scale=True, what="sharded cache")
        assert_as_accurate_as(r["cache_logits"], logits32, logits64, what="sharded logits")


def check_one_block_gathered_at_a_time(ranks, architecture):
    for r in ranks[0][architecture]:
        n_layers = len(r["seen"]["fwd"])
        assert r["seen"]["fwd"] == [(layer, [layer]) for layer in range(n_layers)]
        assert [layer for layer, _ in r["seen"]["bwd"]] == list(reversed(range(n_layers)))
        for layer, gathered in r["seen"]["bwd"]:  # this block, and the next one by FSDP2's default prefetch
            assert layer in gathered and set(gathered) <= {layer, layer - 1}, (layer, gathered)


def check_parameter_bytes_per_rank(ranks, architecture):
    results = ranks[0][architecture]
    total = sum(p.numel() * p.element_size() for p in fb.Bridge.from_hf(tiny_model(architecture)).parameters())
    assert all(r["all_shards"] and r["all_shards_after_cache"] and r["all_shards_after"] for r in results)
    assert sum(r["local_bytes"] for r in results) == total  # the shards partition the leaves
    for r in results:  # dim 0 split in WORLD chunks: at most one row per leaf above an even share
        assert total / WORLD - r["row_bytes"] <= r["local_bytes"] <= total / WORLD + r["row_bytes"]


def check_sharded_bridge_refuses_whole_leaf_views_by_name(ranks):
    for r in ranks[0]["GPT2LMHeadModel"]:
        for what, message in r["refusals"].items():
            assert "FSDP2 shards (DTensors)" in message and "transformer.wte.weight" in message, (what, message)
            assert "full_params" in message
        assert "TransformerLens weights" in r["refusals"]["W_Q"] and "export_hf" in r["refusals"]["to_hf"]
    for architecture in ARCHITECTURES:
        assert all(r["gathered_tl_equal"] for r in ranks[0][architecture])
        assert "pure forward" in r["refusals"]["fb.forward"]


def check_dcp_checkpoint_and_export(ranks, architecture):
    from functional_bridge.distributed import load_checkpoint

    results, directories = ranks[0][architecture], ranks[1]
    for r in results:
        assert r["dcp_sharded_equal"] and r["dcp_plain_equal"]
    assert results[0]["export_logits_equal"] and results[0]["export_state_equal"] and results[0]["export_trained_equal"]
    # one process, no process group: the 2-rank checkpoint loads into a plain bridge
    plain = fb.Bridge.from_hf(tiny_model(architecture, seed=1))
    load_checkpoint(plain, directories[architecture])
    assert all(torch.equal(v.detach(), results[0]["trained"][k]) for k, v in plain.params.items())


def check_dcp_load_refuses_a_mismatch_and_changes_nothing(ranks):
    from functional_bridge.distributed import load_checkpoint

    directories = ranks[1]
    other = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    before = {k: v.detach().clone() for k, v in other.params.items()}
    with pytest.raises(ParamsStructureError, match="missing from the checkpoint.*model.layers.0.self_attn.q_proj.weight"):
        load_checkpoint(other, directories["GPT2LMHeadModel"])
    assert all(torch.equal(v, before[k]) for k, v in other.params.items())


def test_fsdp2_on_two_gloo_processes(tmp_path):
    """Every check_* above on the results of one spawn (a shared fixture would start one spawn per
    pytest-xdist worker that runs one of its tests)."""
    ranks = _run_ranks(tmp_path)
    check_readme_scaling_out_runs_on_two_processes(ranks)
    check_sharded_bridge_refuses_whole_leaf_views_by_name(ranks)
    check_dcp_load_refuses_a_mismatch_and_changes_nothing(ranks)
    for architecture in ARCHITECTURES:
        check_fsdp_training_equals_one_process(ranks, architecture)
        check_sharded_run_with_cache_equals_unsharded(ranks, architecture)
        check_one_block_gathered_at_a_time(ranks, architecture)
        check_parameter_bytes_per_rank(ranks, architecture)
        check_dcp_checkpoint_and_export(ranks, architecture)


def test_fully_shard_bridge_refusals():
    from functional_bridge.distributed import block_containers, fully_shard_bridge

    with pytest.raises(NotImplementedError, match="BertForMaskedLM runs its own forward"):
        fully_shard_bridge(fb.Bridge.from_hf(tiny_model("BertForMaskedLM")))
    bridge = fb.Bridge.from_hf(tiny_model("GPT2LMHeadModel"))
    from torch.distributed.fsdp import MixedPrecisionPolicy

    with pytest.raises(NotImplementedError, match="param_dtype=torch.bfloat16 differs from the leaves' torch.float32"):
        fully_shard_bridge(bridge, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        fully_shard_bridge(bridge)
    assert all(type(module) is torch.nn.Module for module in block_containers(bridge))  # nothing changed


def _every_family(rank: int, world: int, architectures: list[str]) -> dict:
    """Each family sharded: logits, the whole cache and the gradients of the whole batch's loss."""
    from functional_bridge.distributed import fully_shard_bridge

    out = {}
    for architecture in architectures:
        bridge = fully_shard_bridge(fb.Bridge.from_hf(tiny_model(architecture)))
        tokens = global_tokens(bridge.cfg.d_vocab)
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(tokens)
        bridge(tokens, return_type="loss").backward()  # the same batch on every rank: the average is it
        out[architecture] = logits, dict(cache), {name: p.grad.full_tensor() for name, p in bridge.named_parameters()}
    return out


@pytest.mark.slow
def test_every_family_sharded_equals_unsharded():
    from tiny_models import causal_lm_architectures

    architectures = causal_lm_architectures()
    results = run_on_ranks(_every_family, world_size=WORLD, args=(architectures,), timeout=600)[0]
    for architecture in architectures:
        logits, cache, grads = results[architecture]
        hf = tiny_model(architecture)
        oracles = []
        for model in (hf, copy.deepcopy(hf).double()):
            bridge = fb.Bridge.from_hf(model)
            tokens = global_tokens(bridge.cfg.d_vocab)
            with torch.no_grad():
                oracle_logits, oracle_cache = bridge.run_with_cache(tokens)
            bridge(tokens, return_type="loss").backward()
            oracles.append((oracle_logits, oracle_cache, {name: p.grad for name, p in bridge.named_parameters()}))
        (logits32, cache32, grads32), (logits64, cache64, grads64) = oracles
        floats = [name for name, value in cache.items() if value.is_floating_point()]
        assert list(cache) == list(cache32)
        assert all(torch.equal(cache[name], cache32[name]) for name in cache if name not in floats)  # router choices
        assert_as_accurate_as(logits, logits32, logits64, what=f"{architecture} logits")
        pick = lambda c: {name: c[name] for name in floats}  # noqa: E731
        assert_as_accurate_as(pick(cache), pick(cache32), pick(cache64), per_key_scale=True, what=f"{architecture} cache")
        assert_as_accurate_as(grads, grads32, grads64, what=f"{architecture} gradients")
