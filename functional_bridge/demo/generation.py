"""The main job's last act: the trained model continues a repeated random sequence, greedily on
the KV cache, as it is and with its induction heads zero-ablated (a hook on hook_z acting on
every generation step), printed side by side with how many new tokens continue the repeat."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..bridge import Bridge
from .data import repeated_tokens
from .interpret import zero_heads_hook


@dataclass
class GenerationSettings:
    half: int = 12  # random tokens before the repeat (inside the trained lengths 8-24)
    given: int = 2  # tokens of the repeat in the prompt; the model writes the other half - given
    n_seqs: int = 8
    seed: int = 4321


def heads_to_ablate(figures: dict) -> tuple[list[tuple[int, int]], str]:
    """(heads, what they are): the induction heads the job found, or, when none formed, the
    layer-1+ head with the highest induction score at unseen lengths (so the act still shows
    what ablating the best candidate does)."""
    if figures["induction_heads"]:
        heads = [tuple(h) for h in figures["induction_heads"]]
        return heads, "induction head" + "s" * (len(heads) > 1)
    unseen = figures["induction_score_unseen"]
    best = max(((l, h) for l in range(1, len(unseen)) for h in range(len(unseen[l]))), key=lambda x: unseen[x[0]][x[1]])
    return [best], "best induction candidate"


@torch.no_grad()
def continue_repeats(bridge: Bridge, heads: list[tuple[int, int]], settings: GenerationSettings) -> dict[str, torch.Tensor]:
    """{"prompt", "expected", "continuation", "ablated"}: prompts [n_seqs, half + given] (random
    tokens, then the start of their repeat), the rest of the repeat [n_seqs, half - given], and
    the greedy continuations without and with the heads zeroed."""
    generator = torch.Generator().manual_seed(settings.seed)
    tokens = repeated_tokens(settings.n_seqs, settings.half, bridge.cfg.d_vocab, generator, bridge.device)
    cut = settings.half + settings.given
    prompt, expected = tokens[:, :cut], tokens[:, cut:]
    kwargs = dict(max_new_tokens=expected.shape[1], do_sample=False, stop_at_eos=False, verbose=False)
    plain = bridge.generate(prompt, **kwargs)[:, cut:]
    ablated = bridge.generate(prompt, fwd_hooks=zero_heads_hook(heads), **kwargs)[:, cut:]
    return {"prompt": prompt, "expected": expected, "continuation": plain, "ablated": ablated}


def generation_act(bridge: Bridge, figures: dict, settings: GenerationSettings | None = None) -> dict:
    """The act's figures (JSON-ready): the heads ablated, the first sequence's prompt, repeat
    and both continuations, and the matching tokens over all sequences."""
    settings = settings or GenerationSettings()
    start = time.perf_counter()
    heads, kind = heads_to_ablate(figures)
    out = continue_repeats(bridge, heads, settings)
    expected = out["expected"]
    return {
        "heads": [list(h) for h in heads],
        "heads_kind": kind,
        "half": settings.half,
        "given": settings.given,
        "prompt": out["prompt"][0].tolist(),
        "expected": expected[0].tolist(),
        "continuation": out["continuation"][0].tolist(),
        "ablated": out["ablated"][0].tolist(),
        "matches": int((out["continuation"] == expected).sum()),
        "matches_ablated": int((out["ablated"] == expected).sum()),
        "total": expected.numel(),
        "seconds": time.perf_counter() - start,
    }


def generation_lines(act: dict) -> list[str]:
    """The act, printed: one sequence side by side, then the counts over all sequences."""
    heads = ", ".join(f"{l}.{h}" for l, h in act["heads"])
    zeroed = f"{act['heads_kind']} {heads} zeroed"
    n = len(act["expected"])
    row = lambda ids: " ".join(f"{t:3d}" for t in ids)  # noqa: E731
    hits = lambda ids: sum(a == b for a, b in zip(ids, act["expected"]))  # noqa: E731
    width = max(len("the repeat"), len("trained model"), len(zeroed))
    return [
        f"generation (greedy, KV cache): {act['half']} random tokens, the first {act['given']} of their repeat, then {n} new:",
        f"  {'prompt'.ljust(width)}  {row(act['prompt'])}",
        f"  {'the repeat'.ljust(width)}  {row(act['expected'])}",
        f"  {'trained model'.ljust(width)}  {row(act['continuation'])}  ({hits(act['continuation'])}/{n} match)",
        f"  {zeroed.ljust(width)}  {row(act['ablated'])}  ({hits(act['ablated'])}/{n} match)",
        f"over {act['total'] // n} sequences, {act['matches']}/{act['total']} new tokens continue the repeat; "
        f"{act['matches_ablated']}/{act['total']} with the {zeroed}",
    ]
