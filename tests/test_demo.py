"""The main job: python -m functional_bridge (the induction-head demo)."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import functional_bridge as fb
from functional_bridge.__main__ import main
from functional_bridge.demo import train as train_module
from functional_bridge.demo.interpret import EvalSettings, pattern_scores
from functional_bridge.demo.run import DemoSettings, run_demo
from functional_bridge.demo.train import TrainSettings
from tolerance import assert_as_accurate_as, float64_copy


def short_demo(tmp_path, steps=25, **kwargs):
    lines = []
    settings = DemoSettings(train=TrainSettings(steps=steps), eval=EvalSettings(n_seqs=8), out=tmp_path / "out",
                            progress=False, **kwargs)
    figures = run_demo(settings, out=lines.append)
    return figures, lines


def test_short_run_reports_and_writes_figures(tmp_path):
    figures, lines = short_demo(tmp_path)
    written = json.loads((tmp_path / "out" / "figures.json").read_text())
    assert written["training"]["steps_done"] == 25
    assert len(written["induction_score"]) == 2 and len(written["induction_score"][0]) == 4
    # 25 steps cannot form an induction head, and the report says so plainly
    assert any(line.startswith("no induction head formed") for line in lines)
    assert written["loss_first_half"] > 0.8 * written["loss_chance"]


def test_scores_follow_their_definition_on_a_known_pattern():
    """Closed form: a hook that forces one head to attend exactly i -> i - L + 1 gives that head
    induction score 1; another forced to i -> i - 1 gives previous-token score 1."""
    bridge = fb.Bridge.from_config(fb_demo_config(), seed=0)
    half = 6

    def force(pattern, hook):
        pattern = torch.zeros_like(pattern)
        q = torch.arange(2 * half)
        pattern[:, 0, q, torch.clamp(q - half + 1, min=0)] = 1.0
        pattern[:, 1, q, torch.clamp(q - 1, min=0)] = 1.0
        return pattern

    scores = pattern_scores(bridge, half, 4, seed=0, fwd_hooks=[("blocks.1.attn.hook_pattern", force)])
    assert scores["induction"][1, 0] == 1.0 and scores["previous"][1, 1] == 1.0
    assert scores["induction"][1, 1] < 1.0


def fb_demo_config():
    from functional_bridge.demo.run import demo_config

    return demo_config()


def test_ctrl_c_stops_cleanly_and_still_reports(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_next_token_loss = train_module.next_token_loss

    def interrupt_at_ten(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real_next_token_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "next_token_loss", interrupt_at_ten)
    figures, lines = short_demo(tmp_path, steps=100)
    assert figures["training"]["interrupted"] and figures["training"]["steps_done"] == 9
    assert any("interrupted by Ctrl-C" in line for line in lines)
    assert (tmp_path / "out" / "figures.json").exists()


def test_save_reloads_with_hf_and_from_pretrained(tmp_path):
    figures, _ = short_demo(tmp_path, steps=5, save=tmp_path / "model")
    bridge = figures["_bridge"]
    tokens = torch.randint(0, bridge.cfg.d_vocab, (2, 16))
    with torch.no_grad():
        expected = bridge(tokens)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "model").eval()
        assert_as_accurate_as(expected, hf(tokens).logits, float64_copy(hf)(tokens).logits)
        reloaded = fb.Bridge.from_pretrained(str(tmp_path / "model"))
        assert torch.equal(reloaded(tokens), expected)


def test_png_is_skipped_with_a_message_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    from functional_bridge.demo.report import write_pattern_png

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    message = write_pattern_png({"_pattern": ((1, 0), 8, torch.eye(16))}, tmp_path / "x.png")
    assert "matplotlib is not installed" in message and not (tmp_path / "x.png").exists()


def test_png_is_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")
    from functional_bridge.demo.report import write_pattern_png

    assert write_pattern_png({"_pattern": ((1, 0), 8, torch.eye(16))}, tmp_path / "x.png").startswith("wrote")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps: must be a positive integer"),
        (["--seed", "-1"], "--seed: must be >= 0"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_get_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_out_must_not_be_a_file(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(SystemExit):
        main(["demo", "--out", str(target)])
    assert "exists and is not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_default_run_forms_an_induction_head_that_the_ablation_removes(tmp_path):
    """The default schedule: a layer-1 induction head above 0.5 at repeat lengths never seen in
    training, no layer-0 head above 0.3, and zeroing the previous-token heads removes it."""
    lines = []
    figures = run_demo(DemoSettings(out=tmp_path / "out", progress=False), out=lines.append)
    unseen = figures["induction_score_unseen"]
    assert max(unseen[1]) > 0.5, lines
    assert max(unseen[0]) <= 0.3, lines
    assert figures["induction_heads"] and all(layer == 1 for layer, _ in figures["induction_heads"])
    assert any(line.startswith("induction head: 1.") for line in lines)
    ablated = figures["ablation"]["induction_score_unseen"]
    assert max(ablated.values()) < 0.5 * max(unseen[1]), lines
    assert figures["ablation"]["loss_repeated_half"] > 2 * figures["loss_repeated_half"]
