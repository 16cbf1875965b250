"""python -m functional_bridge: the main job runs and shows what it claims."""

import os
import subprocess
import sys

import pytest
import torch

import functional_bridge.__main__ as main_module
from functional_bridge.__main__ import DEFAULT_THREADS, apply_threads, main, thread_plan
from functional_bridge.tour import _tour_model, run_tour
from tolerance import FACTOR, FLOOR_ULPS, check, eps, float64_copy, max_diff


def tour_parity_bound(seed: int) -> float:
    """The tour reports |ours - HF| on its model and tokens. Ours may be FACTOR times further from
    HF's float64 run than HF (eager or sdpa) is; HF itself that far again (the other side)."""
    hf = _tour_model(seed)
    tokens = torch.randint(0, hf.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = float64_copy(hf)(tokens).logits
        errors = []
        for attn in ("eager", "sdpa"):
            hf.set_attn_implementation(attn)
            errors.append(max_diff(hf(tokens).logits, reference))
    floor = FLOOR_ULPS * eps(torch.float32) * reference.abs().max().item()
    return (FACTOR + 1) * max(*errors, floor)


def test_tour_figures():
    lines = []
    figures = run_tour(seed=1, out=lines.append)
    assert figures["parameter_objects"][0] == figures["parameter_objects"][1]
    assert figures["numel"][0] == figures["numel"][1]
    bound = tour_parity_bound(seed=1)
    for key in ("max_abs_logit_diff_eager", "max_abs_logit_diff_sdpa", "max_abs_logit_diff_padded"):
        check(figures[key], bound, key)
    assert figures["tl_view_follows_step"] and figures["W_Q_moved"] > 0
    assert any("parity with HF" in line for line in lines)


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "functional_bridge", "tour"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TL view equals the HF tensors after the step: True" in result.stdout


def test_default_command_is_the_demo_and_logs_progress_without_carriage_returns(tmp_path):
    """stderr is a pipe here, not a terminal: the progress comes as plain lines."""
    result = subprocess.run(
        [sys.executable, "-m", "functional_bridge", "--steps", "20", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},  # the default, whatever the caller exported
    )
    assert result.returncode == 0, result.stderr
    assert "trained 20 steps" in result.stdout and (tmp_path / "figures.json").exists()
    assert f"{DEFAULT_THREADS} thread" in result.stdout
    assert "\r" not in result.stderr and "step 20/20" in result.stderr


def test_help_lists_the_main_jobs_options(capsys):
    for argv in (["--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for option in ("--steps", "--seed", "--out", "--device", "--threads", "--save", "--no-progress"):
            assert option in text, (argv, option)
        assert "tour" in text


@pytest.mark.parametrize(
    "requested, environ, threads, added",
    [
        (None, {}, DEFAULT_THREADS, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(DEFAULT_THREADS)}),
        (3, {}, 3, {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "3"}),
        # the user's own settings are kept
        (None, {"OMP_NUM_THREADS": "4"}, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
        (None, {"OMP_WAIT_POLICY": "ACTIVE"}, DEFAULT_THREADS, {"OMP_NUM_THREADS": str(DEFAULT_THREADS)}),
        (None, {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "active"}, None, {}),
        # an explicit --threads beats an exported OMP_NUM_THREADS
        (2, {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "ACTIVE"}, 2, {"OMP_NUM_THREADS": "2"}),
    ],
)
def test_thread_plan(requested, environ, threads, added):
    assert thread_plan(requested, environ) == (threads, added)


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_apply_threads_sets_torch_and_the_environment(torch_threads):
    environ = {}
    assert apply_threads(None, [], environ=environ) == DEFAULT_THREADS == torch.get_num_threads()
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(DEFAULT_THREADS)}
    assert apply_threads(2, [], environ={}) == 2 == torch.get_num_threads()
    torch.set_num_threads(3)
    assert apply_threads(None, [], environ={"OMP_NUM_THREADS": "3"}) == 3  # the user's choice stands


def test_more_than_one_thread_restarts_once_so_openmp_reads_the_wait_policy(monkeypatch, torch_threads):
    """OpenMP reads OMP_WAIT_POLICY when torch loads it, before __main__ runs: with more than one
    thread and no policy set, the command line re-executes itself with the policy in the
    environment; with one thread, or a policy already set, it does not."""
    calls = []
    monkeypatch.setattr(main_module.os, "execv", lambda path, args: calls.append((path, args)))
    apply_threads(1, ["--steps", "5"], restart=True, environ={})
    apply_threads(2, ["--steps", "5"], restart=True, environ={"OMP_WAIT_POLICY": "ACTIVE"})
    assert calls == []
    environ = {}
    apply_threads(2, ["--threads", "2"], restart=True, environ=environ)
    assert calls == [(sys.executable, [sys.executable, "-m", "functional_bridge", "--threads", "2"])]
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"
    # the restarted process finds the policy set and runs on
    apply_threads(2, ["--threads", "2"], restart=True, environ=environ)
    assert len(calls) == 1
