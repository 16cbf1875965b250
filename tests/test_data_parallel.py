"""Data-parallel analysis and resumable sweeps (functional_bridge.distributed): the chunking covers
every row once; results gathered over 2 gloo processes equal one process (bit for bit against a
Python loop over the same chunks; within float32 rounding against one call on the whole
dataset); a sweep interrupted, or a rank killed, resumes without recomputing finished chunks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import functional_bridge as fb
from functional_bridge import distributed as dp
from functional_bridge.distributed.data_parallel import balanced
from gloo import run_on_ranks
from helpers import make_gpt2
from tolerance import assert_rounding_close, forward_depth, max_abs

N, POS = 7, 6  # 7 rows: no chunk size or world size used here divides it


def dataset():
    """tokens [N, POS], a left-padding mask, answer pairs [N, 2] (per-example extras), corrupted tokens."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 97, (N, POS), generator=gen)
    corrupted = torch.randint(0, 97, (N, POS), generator=gen)
    mask = torch.ones(N, POS, dtype=torch.long)
    mask[1, :2] = 0
    mask[4, :1] = 0
    answers = torch.randint(0, 97, (N, 2), generator=gen)
    return tokens, corrupted, mask, answers


def logit_diff(logits, answers):  # [rows]: correct minus wrong answer at the last position
    last = logits[:, -1]
    return last.gather(-1, answers[:, :1])[:, 0] - last.gather(-1, answers[:, 1:])[:, 0]


def model():
    bridge = fb.Bridge.from_hf(make_gpt2(seed=1))
    return bridge.params, bridge.cfg


NAMES = ["blocks.1.hook_resid_post", "blocks.2.attn.hook_z"]


def loop_over_chunks(fn, data, chunk_size):
    """The oracle for bitwise checks: fn on each chunk of chunk_size rows, in order, concatenated."""
    outs = [fn(*(None if t is None else t[s : s + chunk_size] for t in data)) for s in range(0, N, chunk_size)]
    if isinstance(outs[0], dict):
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return torch.cat(outs)


# -- chunking, in one process ---------------------------------------------------------------------


@pytest.mark.parametrize("strided", [False, True])
def test_chunks_cover_every_row_once_and_balance(strided):
    for n in range(0, 12):
        for world in range(1, 5):
            assert sorted(len(balanced(n, world, r)) for r in range(world))[-1] - min(len(balanced(n, world, r)) for r in range(world)) <= 1
            for chunk_size in (None, 1, 3):
                chunks = dp.chunk_ranges(n, chunk_size, world)
                rows = [row for r in range(world) for c in dp.rank_chunks(len(chunks), r, world, strided) for row in chunks[c]]
                assert sorted(rows) == list(range(n)), (n, world, chunk_size)


def test_one_process_without_a_group_is_rank_0_of_1():
    tokens, _, mask, _ = dataset()
    assert dp.rank_and_world() == (0, 1)
    rows = dp.map_dataset(lambda t, m: t * m, (tokens, mask), chunk_size=3)
    assert torch.equal(rows, tokens * mask)
    total = dp.map_dataset(lambda t, m: {"s": t.sum(0)}, (tokens, mask), chunk_size=3, combine="sum")
    assert torch.equal(total["s"], tokens.sum(0))
    with pytest.raises(ValueError, match="same leading number of rows"):
        dp.map_dataset(lambda t, m: t, (tokens, mask[:3]))
    with pytest.raises(ValueError, match="lead with the chunk's 3 rows"):
        dp.map_dataset(lambda t: t.sum(), tokens, chunk_size=3)


def test_an_interrupted_sweep_resumes_and_refuses_another_sweep(tmp_path):
    tokens, _, mask, _ = dataset()
    calls = []

    def fn(t, m):
        calls.append(1)
        if len(calls) == 3 and failing:
            raise KeyboardInterrupt("interrupted")  # preempted after two finished chunks
        return {"x": t * m, "n": m.sum(1)}

    failing = True
    with pytest.raises(KeyboardInterrupt):
        dp.resumable_map_dataset(fn, (tokens, mask), tmp_path, chunk_size=2, key="t*m")
    assert len(list(tmp_path.glob("chunk_*.pt"))) == 2 and not list(tmp_path.glob(".*tmp"))
    failing = False
    done = dp.resumable_map_dataset(fn, (tokens, mask), tmp_path, chunk_size=2, key="t*m")
    assert (done.computed, done.reused) == (2, 2)  # 4 chunks of 2, 2, 2, 1 rows
    assert torch.equal(done.value["x"], tokens * mask) and torch.equal(done.value["n"], mask.sum(1))
    again = dp.resumable_map_dataset(fn, (tokens, mask), tmp_path, chunk_size=2, key="t*m")
    assert (again.computed, again.reused) == (0, 4) and torch.equal(again.value["x"], tokens * mask)
    for change in (dict(key="other"), dict(chunk_size=3)):
        with pytest.raises(ValueError, match="holds another sweep"):
            dp.resumable_map_dataset(fn, (tokens, mask), tmp_path, **{"chunk_size": 2, "key": "t*m", **change})
    with pytest.raises(ValueError, match="data_sha256"):
        dp.resumable_map_dataset(fn, (tokens + 1, mask), tmp_path, chunk_size=2, key="t*m")


# -- 2 gloo processes -----------------------------------------------------------------------------


def _analysis_on_ranks(rank, world, directory):
    torch.manual_seed(0)
    params, cfg = model()
    tokens, corrupted, mask, answers = dataset()
    out = {}
    cache_fn = dp.cached_activations(params, cfg, NAMES, reduce=dp.last_token)
    out["cache_chunked"] = dp.map_dataset(cache_fn, (tokens, mask), chunk_size=2)  # rank 0 only
    full_fn = dp.cached_activations(params, cfg, NAMES)
    out["cache_sharded_all"] = dp.map_dataset(full_fn, (tokens, mask), strided=True, dst=None)  # every rank
    grads_fn = dp.example_grads(params, cfg)
    out["grads"] = dp.map_dataset(grads_fn, (tokens, mask), chunk_size=3, strided=True)
    patch_fn = dp.patching_scores(params, cfg, logit_diff)
    out["patching"] = dp.map_dataset(patch_fn, (tokens, corrupted, mask, answers), chunk_size=3, dst=1)
    attr_fn = dp.attribution_scores(params, cfg, logit_diff)
    out["attribution"] = dp.map_dataset(attr_fn, (tokens, corrupted, mask, answers), chunk_size=2)
    out["summed"] = dp.map_dataset(lambda t, m: {"tokens": (t * m).sum(0)}, (tokens, mask), chunk_size=2, combine="sum")
    # a sweep interrupted on both ranks (a preempted job: rank 0 after 1 chunk, rank 1 after 2), then rerun
    attempts = []

    def flaky(t, m):
        attempts.append(1)
        if failing and len(attempts) > rank + 1:
            raise RuntimeError("preempted")
        return cache_fn(t, m)

    failing = True
    try:
        dp.resumable_map_dataset(flaky, (tokens, mask), directory, chunk_size=1, key="cache")
    except RuntimeError as error:
        out["interrupted"] = str(error)
    failing = False
    out["resumed"] = dp.resumable_map_dataset(flaky, (tokens, mask), directory, chunk_size=1, key="cache")
    return out


def _killed_on_ranks(rank, world, directory):
    """Rank 1 dies (os._exit) after one chunk of its own; rank 0 finishes its chunks."""
    params, cfg = model()
    tokens, _, mask, _ = dataset()
    cache_fn = dp.cached_activations(params, cfg, NAMES, reduce=dp.last_token)
    done = []

    def fn(t, m):
        if rank == 1 and done:
            os._exit(3)
        done.append(1)
        return cache_fn(t, m)

    return dp.resumable_map_dataset(fn, (tokens, mask), directory, chunk_size=1, key="cache")


@pytest.fixture(scope="module")
def on_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sweep")
    return run_on_ranks(_analysis_on_ranks, world_size=2, args=(str(directory),), timeout=240)


def test_gathered_cache_equals_one_process(on_ranks):
    params, cfg = model()
    tokens, _, mask, _ = dataset()
    torch.set_num_threads(1)  # as each rank: then same chunk, same kernels, same bits
    try:
        chunked = loop_over_chunks(dp.cached_activations(params, cfg, NAMES, reduce=dp.last_token), (tokens, mask), 2)
        _, whole = fb.run_with_cache(params, tokens, cfg, names_filter=NAMES, attention_mask=mask)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    assert on_ranks[1]["cache_chunked"] is None  # dst=0
    for name in NAMES:
        assert torch.equal(on_ranks[0]["cache_chunked"][name], chunked[name]), name
        # rank r's strided rows in one batch vs the whole dataset in one: batch size differs
        for rank in (0, 1):
            assert_rounding_close(on_ranks[rank]["cache_sharded_all"][name], whole[name], n=forward_depth(cfg, POS), what=name)
        assert torch.equal(dp.last_token(whole[name], mask), dp.last_token(whole[name], mask))
    last = dp.last_token(whole["blocks.1.hook_resid_post"], mask)
    assert_rounding_close(on_ranks[0]["cache_chunked"]["blocks.1.hook_resid_post"], last, n=forward_depth(cfg, POS))


def test_gathered_per_example_grads_equal_one_process(on_ranks):
    params, cfg = model()
    tokens, _, mask, _ = dataset()
    torch.set_num_threads(1)
    try:
        chunked = loop_over_chunks(dp.example_grads(params, cfg), (tokens, mask), 3)
        whole = fb.per_example_grads(params, cfg, tokens, mask)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    grads = on_ranks[0]["grads"]
    assert list(grads) == list(params)
    scale = max(max_abs(g) for g in whole.values())
    for name in grads:
        assert torch.equal(grads[name], chunked[name]), name
        assert_rounding_close(grads[name], whole[name], n=2 * forward_depth(cfg, POS), scale=scale, what=name)


def test_gathered_patching_and_attribution_equal_one_process(on_ranks):
    params, cfg = model()
    tokens, corrupted, mask, answers = dataset()
    assert on_ranks[0]["patching"] is None  # dst=1
    patched = on_ranks[1]["patching"]  # [N, n_layers, n_heads]
    assert patched.shape == (N, cfg.n_layers, cfg.n_heads)
    for row in range(N):  # oracle: each example alone through the one-process sweep, scalar metric
        alone = fb.patching.head_z_patching(
            params, cfg, tokens[row : row + 1], corrupted[row : row + 1], lambda l: logit_diff(l, answers[row : row + 1])[0],
            attention_mask=mask[row : row + 1],
        )  # fmt: skip
        assert_rounding_close(patched[row], alone, n=forward_depth(cfg, POS), what=f"row {row}")
    attributed = on_ranks[0]["attribution"]
    whole = fb.patching.head_z_attribution(params, cfg, tokens, corrupted, lambda l: logit_diff(l, answers).sum(), attention_mask=mask)
    scale = attributed.abs().sum(0).max().item()
    assert_rounding_close(attributed.sum(0), whole, n=N * forward_depth(cfg, POS), scale=scale, what="attribution")
    assert torch.equal(on_ranks[0]["summed"]["tokens"], (tokens * mask).sum(0))


def test_an_interrupted_sweep_on_two_ranks_resumes(on_ranks):
    params, cfg = model()
    tokens, _, mask, _ = dataset()
    assert all(r["interrupted"] == "preempted" for r in on_ranks)
    # chunk_size 1: rank 0 holds rows 0-3, rank 1 rows 4-6; they had finished 1 and 2
    assert [(r["resumed"].computed, r["resumed"].reused) for r in on_ranks] == [(3, 1), (1, 2)]
    assert on_ranks[1]["resumed"].value is None
    torch.set_num_threads(1)
    try:
        oracle = loop_over_chunks(dp.cached_activations(params, cfg, NAMES, reduce=dp.last_token), (tokens, mask), 1)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    for name in NAMES:
        assert torch.equal(on_ranks[0]["resumed"].value[name], oracle[name])


@pytest.mark.slow  # a second spawn of 2 processes
def test_a_killed_rank_is_resumed_by_another_number_of_ranks(tmp_path):
    with pytest.raises(RuntimeError, match="exited"):
        run_on_ranks(_killed_on_ranks, world_size=2, args=(str(tmp_path),), timeout=120)
    finished = len(list(Path(tmp_path).glob("chunk_*.pt")))
    assert 1 <= finished < N
    params, cfg = model()
    tokens, _, mask, _ = dataset()
    fn = dp.cached_activations(params, cfg, NAMES, reduce=dp.last_token)
    resumed = dp.resumable_map_dataset(fn, (tokens, mask), tmp_path, chunk_size=1, key="cache")  # one process now
    assert (resumed.computed, resumed.reused) == (N - finished, finished)
    oracle = loop_over_chunks(fn, (tokens, mask), 1)
    for name in NAMES:
        # chunks from the dead run were computed at one thread, this process may use two
        assert_rounding_close(resumed.value[name], oracle[name], n=forward_depth(cfg, POS), what=name)


def test_resid_pre_sweeps_and_reductions_per_example_in_one_process():
    """The other patching sweeps, per example through map_dataset (no group: rank 0 of 1), against
    the one-process sweeps on each row alone (patching) and on the whole dataset (attribution)."""
    params, cfg = model()
    tokens, corrupted, mask, answers = dataset()
    patch_fn = dp.patching_scores(params, cfg, logit_diff, sweep=fb.patching.resid_pre_patching)
    rows = dp.map_dataset(patch_fn, (tokens, corrupted, mask, answers), chunk_size=3)
    assert rows.shape == (N, cfg.n_layers, POS)
    for row in (0, 1, 6):
        alone = fb.patching.resid_pre_patching(
            params, cfg, tokens[row : row + 1], corrupted[row : row + 1], lambda l: logit_diff(l, answers[row : row + 1])[0],
            attention_mask=mask[row : row + 1],
        )  # fmt: skip
        assert_rounding_close(rows[row], alone, n=forward_depth(cfg, POS), what=f"row {row}")
    attr_fn = dp.attribution_scores(params, cfg, logit_diff, sweep=fb.patching.resid_pre_attribution)
    attributed = dp.map_dataset(attr_fn, (tokens, corrupted, mask, answers), chunk_size=3)
    whole = fb.patching.resid_pre_attribution(params, cfg, tokens, corrupted, lambda l: logit_diff(l, answers).sum(), attention_mask=mask)
    assert attributed.shape == (N, cfg.n_layers, POS)
    assert_rounding_close(attributed.sum(0), whole, n=N * forward_depth(cfg, POS), scale=attributed.abs().sum(0).max().item())
    acts = torch.randn(N, POS, 5, generator=torch.Generator().manual_seed(0))
    for row in range(N):  # a Python loop over each row's real tokens
        real = mask[row].bool()
        assert torch.equal(dp.last_token(acts, mask)[row], acts[row, real.nonzero().max()])
        assert_rounding_close(dp.mean_over_tokens(acts, mask)[row], acts[row, real].mean(0), n=POS)
