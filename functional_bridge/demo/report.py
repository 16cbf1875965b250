"""The demo's report: a short text, a JSON of every figure, and a PNG of an induction head."""

from __future__ import annotations

import json
from pathlib import Path


def _head(head) -> str:
    return f"{head[0]}.{head[1]}"


def report_lines(figures: dict) -> list[str]:
    """The printed report; says plainly when no induction head formed."""
    lines = []
    train = figures.get("training", {})
    if train:
        stop = " (interrupted by Ctrl-C)" if train.get("interrupted") else ""
        threads = train.get("threads")
        on = f", {threads} thread{'s' * (threads > 1)}" if threads else ""
        lines.append(
            f"trained {train['steps_done']} steps in {train['seconds']:.1f} s ({train['steps_per_second']:.0f} steps/s{on})"
            f"{stop}; final loss {train['final_loss']:.3f}"
        )
    unseen = figures["induction_score_unseen"]
    induction = figures["induction_score"]
    previous = figures["previous_token_score"]
    lengths = ", ".join(map(str, figures["lengths_seen"]))
    new = ", ".join(map(str, figures["lengths_unseen"]))
    lines.append(f"attention scores over repeat lengths {lengths} (trained) and {new} (never seen in training):")
    if not figures["induction_heads"]:
        best = max(((l, h) for l in range(len(unseen)) for h in range(len(unseen[l]))), key=lambda x: unseen[x[0]][x[1]])
        lines.append(
            f"no induction head formed: the best head, {_head(best)}, scores {unseen[best[0]][best[1]]:.2f} at unseen lengths"
        )
    for layer, head in figures["induction_heads"]:
        lines.append(
            f"induction head: {layer}.{head} (score {unseen[layer][head]:.2f} at unseen lengths, "
            f"{induction[layer][head]:.2f} over all; OV copying score {figures['copying_score'][layer][head]:+.2f})"
        )
    for layer, head in figures["previous_token_heads"]:
        lines.append(f"previous-token head: {layer}.{head} (score {previous[layer][head]:.2f})")
    top_layer0 = max(unseen[0])
    lines.append(f"highest layer-0 induction score: {top_layer0:.2f}")
    lines.append(
        f"loss on the first half {figures['loss_first_half']:.2f} (chance {figures['loss_chance']:.2f}), "
        f"on the repeated half {figures['loss_repeated_half']:.2f}"
    )
    k_comp = figures.get("k_composition")
    if k_comp:
        best = max(k_comp, key=k_comp.get)
        lines.append(
            f"K-composition, previous-token -> induction heads: mean {sum(k_comp.values()) / len(k_comp):.2f}, "
            f"highest {best} {k_comp[best]:.2f} (Gaussian weights of the same shapes: "
            f"{figures['k_composition_random_baseline']:.2f})"
        )
    ablation = figures.get("ablation")
    if ablation:
        zeroed = ", ".join(_head(h) for h in ablation["zeroed_heads"])
        after = ", ".join(f"{k} {v:.2f}" for k, v in ablation["induction_score_unseen"].items())
        lines.append(
            f"zeroing previous-token heads {zeroed}: induction scores fall to {after}; "
            f"repeated-half loss rises to {ablation['loss_repeated_half']:.2f}"
        )
    norms = ", ".join(f"{n:.2f}" for n in figures["per_example_grad_norms"])
    lines.append(f"per-example gradient norms (vmap over 4 sequences): {norms}")
    if figures.get("generation"):
        from .generation import generation_lines

        lines.extend(generation_lines(figures["generation"]))
    return lines


def write_json(figures: dict, path: Path) -> None:
    public = {k: v for k, v in figures.items() if not k.startswith("_")}
    path.write_text(json.dumps(public, indent=2, default=str))


PNG_DEPENDENCY_HINT = "pip install 'functional-bridge[plot]'"


def pattern_figure(head: tuple[int, int], half: int, pattern):
    """A matplotlib Figure of one head's attention pattern [query_pos, key_pos] on x + x with
    half-length `half`: labelled axes and colorbar, and lines where the repeat starts."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    fig = Figure(figsize=(5.5, 4.8))
    ax = fig.add_subplot()
    image = ax.imshow(pattern.numpy(), cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(f"induction head {head[0]}.{head[1]}: {half} random tokens, then the same {half} again", fontsize="medium")
    ax.set_xlabel("key position (attended to)")
    ax.set_ylabel("query position (attending)")
    repeat = half - 0.5  # the boundary between position half - 1 and the repeat's first token
    ax.axvline(repeat, color="white", linestyle="--", linewidth=1)
    ax.axhline(repeat, color="white", linestyle="--", linewidth=1, label="repeat starts")
    ax.legend(loc="upper right", fontsize="small")
    fig.colorbar(image, ax=ax, fraction=0.046, label="attention probability")
    fig.tight_layout()
    return fig


def write_pattern_png(figures: dict, path: Path) -> str:
    """The attention pattern of the strongest induction head; returns what happened, in words."""
    if figures.get("_pattern") is None:
        return "no induction head, so no pattern plot"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return f"matplotlib is not installed ({PNG_DEPENDENCY_HINT}): skipped the PNG"
    head, half, pattern = figures["_pattern"]
    pattern_figure(head, half, pattern).savefig(path, dpi=120)
    return f"wrote {path}"
