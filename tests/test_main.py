"""python -m functional_bridge: the main job runs and shows what it claims."""

import subprocess
import sys

from functional_bridge.tour import run_tour


def test_tour_figures():
    lines = []
    figures = run_tour(seed=1, out=lines.append)
    assert figures["parameter_objects"][0] == figures["parameter_objects"][1]
    assert figures["numel"][0] == figures["numel"][1]
    for key in ("max_abs_logit_diff_eager", "max_abs_logit_diff_sdpa", "max_abs_logit_diff_padded"):
        assert figures[key] <= 1e-5
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
