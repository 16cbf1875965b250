"""The demo, end to end, as acts in order: build a small Llama locally, train it through the
bridge, interpret it, report. Each act is one function here; a new act (say, generation) goes
between interpret and report and adds its figures to the same dict."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..bridge import Bridge
from .generation import generation_act
from .interpret import EvalSettings, interpret
from .report import report_lines, write_json, write_pattern_png
from .train import TrainSettings, train


def demo_config(seed: int = 0):
    """A 2-layer Llama (RoPE: relative positions, so no positional shortcut to the repeat)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=None,
    )  # fmt: skip


@dataclass
class DemoSettings:
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    out: Path | None = None
    device: str = "cpu"
    save: Path | None = None
    progress: bool = True
    threads: int | None = None  # what the command line chose (reported; set by __main__)


# The analysis after training (interpret, report, PNG) in training-step equivalents, for the
# progress line's ETA: its time over the mean training step's, measured on a 2-core AMD EPYC at
# one thread (32-33 for seeds 0-2; the ratio, unlike the seconds, carries over between machines).
ANALYSIS_STEP_EQUIVALENTS = 32


def default_out_dir() -> Path:
    return Path.cwd() / time.strftime("fb-demo-%Y%m%d-%H%M%S")


def build(settings: DemoSettings, out=print) -> Bridge:
    """The model: a 2-layer Llama from a config, random init, on the chosen device."""
    torch.manual_seed(settings.train.seed)
    bridge = Bridge.from_config(demo_config(), seed=settings.train.seed).to(settings.device)
    n_params = sum(p.numel() for p in bridge.parameters())
    low, high = settings.train.lengths
    threads = "" if settings.threads is None else f", {settings.threads} CPU thread{'s' * (settings.threads > 1)}"
    out(f"training a 2-layer Llama ({n_params:,} parameters) on x + x, repeat lengths {low}-{high}, "
        f"AdamW over bridge.parameters(){threads}")  # fmt: skip
    return bridge


def training_act(bridge: Bridge, settings: DemoSettings) -> dict:
    """Train in place; returns the training figures."""
    result = train(bridge, settings.train, progress=settings.progress, after_steps=ANALYSIS_STEP_EQUIVALENTS)
    return {
        "steps_done": result.steps_done,
        "seconds": result.seconds,
        "steps_per_second": result.steps_done / max(result.seconds, 1e-9),
        "final_loss": sum(result.losses[-20:]) / max(len(result.losses[-20:]), 1),
        "interrupted": result.interrupted,
        "threads": settings.threads,
        "settings": asdict(settings.train),
    }


def report_act(figures: dict, out_dir: Path, out=print) -> None:
    """Print the report; write the induction head's PNG."""
    for line in report_lines(figures):
        out(line)
    out(write_pattern_png(figures, out_dir / "induction_head.png"))


def run_demo(settings: DemoSettings, out=print) -> dict:
    """The main job's acts in order: build, train, interpret, generate, report (and save with --save).
    Returns every figure, plus the trained bridge under "_bridge"."""
    out_dir = settings.out or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    bridge = build(settings, out)
    seconds = {"build": lap()}
    training = training_act(bridge, settings)
    seconds["train"] = lap()
    figures = {**interpret(bridge, settings.eval), "training": training, "seconds": seconds}
    seconds["interpret"] = lap()
    figures["generation"] = generation_act(bridge, figures)
    seconds["generate"] = lap()
    report_act(figures, out_dir, out)
    seconds["report"] = lap()
    out(f"took {clock[-1] - clock[0]:.0f} s: building the model {seconds['build']:.0f} s, training "
        f"{seconds['train']:.0f} s, analysis, generation and report {seconds['interpret'] + seconds['generate'] + seconds['report']:.0f} s")
    write_json(figures, out_dir / "figures.json")
    out(f"figures: {out_dir / 'figures.json'}")
    if settings.save is not None:
        bridge.to_hf().save_pretrained(settings.save)
        out(f"saved the trained model (HF format) to {settings.save}")
    figures["_bridge"] = bridge
    return figures
