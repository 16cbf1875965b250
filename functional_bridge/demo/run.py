"""The demo, end to end: build a small Llama locally, train it through the bridge, interpret it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..bridge import Bridge
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


def default_out_dir() -> Path:
    return Path.cwd() / time.strftime("fb-demo-%Y%m%d-%H%M%S")


def run_demo(settings: DemoSettings, out=print) -> dict:
    """Train, interpret, print the report, write JSON/PNG (and the model with --save)."""
    out_dir = settings.out or default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.train.seed)
    bridge = Bridge.from_config(demo_config(), seed=settings.train.seed).to(settings.device)
    n_params = sum(p.numel() for p in bridge.parameters())
    out(f"training a 2-layer Llama ({n_params:,} parameters) on x + x, repeat lengths "
        f"{settings.train.lengths[0]}-{settings.train.lengths[1]}, AdamW over bridge.parameters()")
    result = train(bridge, settings.train, progress=settings.progress)
    figures = interpret(bridge, settings.eval)
    figures["training"] = {
        "steps_done": result.steps_done,
        "seconds": result.seconds,
        "steps_per_second": result.steps_done / max(result.seconds, 1e-9),
        "final_loss": sum(result.losses[-20:]) / max(len(result.losses[-20:]), 1),
        "interrupted": result.interrupted,
        "settings": asdict(settings.train),
    }
    for line in report_lines(figures):
        out(line)
    write_json(figures, out_dir / "figures.json")
    out(write_pattern_png(figures, out_dir / "induction_head.png"))
    out(f"figures: {out_dir / 'figures.json'}")
    if settings.save is not None:
        bridge.to_hf().save_pretrained(settings.save)
        out(f"saved the trained model (HF format) to {settings.save}")
    figures["_bridge"] = bridge
    return figures
