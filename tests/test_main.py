"""python -m functional_bridge: the main job runs and shows what it claims."""

import subprocess
import sys

import torch

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


def test_default_command_is_the_demo(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "functional_bridge", "--steps", "3", "--no-progress", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "trained 3 steps" in result.stdout and (tmp_path / "figures.json").exists()
