"""The main job: python -m functional_bridge (the induction-head demo)."""

import io
import json
import random

import pytest
import torch
from transformers import LlamaForCausalLM

import functional_bridge as fb
from functional_bridge.__main__ import DEFAULT_THREADS, main
from functional_bridge.demo import train as train_module
from functional_bridge.demo.generation import GenerationSettings, continue_repeats
from functional_bridge.demo.interpret import EvalSettings, pattern_scores, zero_heads_hook
from functional_bridge.demo.progress import ProgressBar
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


def test_generation_act_is_printed_and_equals_a_run_with_hooks_loop(tmp_path):
    """The last act on the short run (no induction head forms in 25 steps: the best layer-1
    candidate is ablated): printed side by side, and each continuation equals a greedy loop of
    run_with_hooks on the growing sequence, with the heads' hook_z zeroed or not."""
    figures, lines = short_demo(tmp_path)
    act, bridge = figures["generation"], figures["_bridge"]
    assert act["heads_kind"] == "best induction candidate" and act["heads"][0][0] == 1
    printed = "\n".join(lines)
    assert "generation (greedy, KV cache)" in printed and "best induction candidate 1." in printed
    assert f"{act['matches']}/{act['total']} new tokens continue the repeat" in printed
    out = continue_repeats(bridge, [tuple(h) for h in act["heads"]], GenerationSettings())
    for key, hooks in (("continuation", ()), ("ablated", zero_heads_hook([tuple(h) for h in act["heads"]]))):
        sequence = out["prompt"]
        for _ in range(out["expected"].shape[1]):
            with torch.no_grad():
                logits = bridge.run_with_hooks(sequence, fwd_hooks=hooks)
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out[key], sequence[:, out["prompt"].shape[1] :]), key
    assert act["continuation"] == out["continuation"][0].tolist() and act["ablated"] == out["ablated"][0].tolist()
    assert act["matches"] == int((out["continuation"] == out["expected"]).sum())
    assert act["matches_ablated"] == int((out["ablated"] == out["expected"]).sum())


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


def test_png_is_the_heads_pattern_with_labelled_colorbar_and_repeat_mark(tmp_path):
    pytest.importorskip("matplotlib")
    from functional_bridge.demo.report import pattern_figure, write_pattern_png

    half, pattern = 8, torch.eye(16)
    fig = pattern_figure((1, 0), half, pattern)
    image_axes, colorbar_axes = fig.axes
    assert colorbar_axes.get_ylabel() == "attention probability"
    assert image_axes.get_xlabel().startswith("key position") and image_axes.get_ylabel().startswith("query position")
    assert torch.equal(torch.as_tensor(image_axes.images[0].get_array()), pattern)
    # one vertical and one horizontal line, both on the boundary before the repeat's first token
    marks = sorted((tuple(line.get_xdata()), tuple(line.get_ydata())) for line in image_axes.lines)
    assert marks == sorted([((half - 0.5, half - 0.5), (0, 1)), ((0, 1), (half - 0.5, half - 0.5))])
    assert "repeat starts" in [text.get_text() for text in image_axes.get_legend().get_texts()]

    path = tmp_path / "x.png"
    assert write_pattern_png({"_pattern": ((1, 0), half, pattern)}, path) == f"wrote {path}"
    png = path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (round(fig.get_figwidth() * 120), round(fig.get_figheight() * 120))


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
    """The default schedule, at the main job's default thread count: a layer-1 induction head
    above 0.5 at repeat lengths never seen in training, no layer-0 head above 0.3, and zeroing the
    previous-token heads halves its score and more than doubles the repeated half's loss. The
    last act: greedy continuations of repeats match them for more than half the new tokens
    (seed 0: 57/80), and under a quarter as often with the induction heads zeroed (seed 0: 0/80)."""
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        figures = run_demo(DemoSettings(out=tmp_path / "out", progress=False), out=lines.append)
    finally:
        torch.set_num_threads(threads)
    unseen = figures["induction_score_unseen"]
    assert max(unseen[1]) > 0.5, lines
    assert max(unseen[0]) <= 0.3, lines
    assert figures["induction_heads"] and all(layer == 1 for layer, _ in figures["induction_heads"])
    assert any(line.startswith("induction head: 1.") for line in lines)
    ablated = figures["ablation"]["induction_score_unseen"]
    assert max(ablated.values()) < 0.5 * max(unseen[1]), lines
    assert figures["ablation"]["loss_repeated_half"] > 2 * figures["loss_repeated_half"]
    # the last act: the trained model continues the repeat, and far less with its induction heads zeroed
    act = figures["generation"]
    assert act["heads_kind"].startswith("induction head") and act["heads"] == figures["induction_heads"]
    assert act["matches"] > 0.5 * act["total"] and act["matches_ablated"] < 0.25 * act["matches"], lines
    assert any(line.startswith("over 8 sequences") for line in lines)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "out" / "induction_head.png").read_bytes()[:4] == b"\x89PNG"


class FakeClock:
    """Advances a fixed time per reading, so the rate is known in closed form."""

    def __init__(self, seconds_per_call: float):
        self.now, self.step = 0.0, seconds_per_call

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class TerminalStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def run_bar(stream, total=200, after_steps=0.0, seconds_per_step=0.1):
    bar = ProgressBar(total, stream, after_steps=after_steps, clock=FakeClock(seconds_per_step))
    for step in range(1, total + 1):
        bar.update(step, loss=1.0, force=step == total)
    bar.close()
    return bar


def test_progress_off_a_terminal_prints_plain_lines_every_tenth():
    stream = io.StringIO()
    run_bar(stream, total=200)
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split()[1] for line in lines] == [f"{step}/200" for step in range(20, 201, 20)]


def test_progress_on_a_terminal_redraws_one_line():
    stream = TerminalStream()
    run_bar(stream, total=200)
    text = stream.getvalue()
    assert text.count("\r") > 1 and text.endswith("\n") and text.count("\n") == 1
    assert "step 200/200" in text.rsplit("\r", 1)[1]


def test_progress_eta_is_remaining_work_over_the_measured_rate():
    """0.1 s per step is 10 steps/s: with 150 of 200 steps left and 60 step-equivalents of
    analysis to come, the ETA is 21 s; the first steps (warm-up) are not measured."""
    bar = ProgressBar(200, io.StringIO(), after_steps=60, clock=FakeClock(0.1))
    for step in range(1, 4):
        bar.update(step, loss=1.0)
    assert bar.eta_seconds(3) is None and "measuring speed" in bar.describe(3, 1.0)
    for step in range(4, 51):
        bar.update(step, loss=1.0)
    assert bar.meter.rate == pytest.approx(10.0)
    assert bar.eta_seconds(50) == pytest.approx((150 + 60) / 10)
    assert "ETA 21 s" in bar.describe(50, 1.0) and "10 steps/s" in bar.describe(50, 1.0)


def test_progress_rate_follows_a_slowdown():
    """After the machine gets busy (0.1 s -> 0.4 s a step) the rate converges to 2.5 steps/s."""
    clock = FakeClock(0.1)
    bar = ProgressBar(1000, io.StringIO(), clock=clock)
    for step in range(1, 101):
        bar.update(step, loss=1.0)
    clock.step = 0.4
    for step in range(101, 201):
        bar.update(step, loss=1.0)
    assert bar.meter.rate == pytest.approx(2.5, rel=1e-3)
    assert bar.eta_seconds(200) == pytest.approx(800 / 2.5, rel=1e-3)


class JitterClock:
    """Step times drawn uniformly from 0.01-0.09 s (seeded): a steady mean of 20 steps/s, with
    the jitter a shared machine gives."""

    def __init__(self, seed: int):
        self.now, self.random = 0.0, random.Random(seed)

    def __call__(self) -> float:
        self.now += self.random.uniform(0.01, 0.09)
        return self.now


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_progress_eta_is_steady_when_step_times_jitter(seed):
    """Once five time constants (3 s each) have passed, every rate reading stays within 15% of
    the true 20 steps/s: a time constant holds ~60 steps, whose mean step time has a relative
    standard deviation of (0.08 / sqrt(12)) / 0.05 / sqrt(60) = 6%, and 15% is 2.5 of those. A
    moving average over a fixed count of 0.05 s intervals read 13-36 steps/s here."""
    bar = ProgressBar(2000, io.StringIO(), clock=JitterClock(seed))
    readings = []
    for step in range(1, 2001):
        bar.update(step, loss=1.0)
        if step > 300:  # 15 s
            readings.append(bar.meter.rate)
    assert all(abs(rate - 20.0) <= 0.15 * 20.0 for rate in readings), (min(readings), max(readings))
