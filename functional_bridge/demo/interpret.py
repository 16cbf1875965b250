"""Interpreting the trained model through the same bridge: attention-pattern scores, OV copying,
K-composition, the repeated-half loss, an ablation, and per-example gradient norms.

Every figure is read from the bridge's current leaves (run_with_cache patterns, tl_parameters
through FactoredMatrix), with no conversion between training and analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..analysis import FactoredMatrix, all_composition_scores, composition_scores
from ..bridge import Bridge
from ..func import per_example_grads
from ..weights import tl_weights
from .data import repeated_tokens


def _pattern_names(bridge: Bridge) -> list[str]:
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(bridge.cfg.n_layers)]


@torch.no_grad()
def pattern_scores(bridge: Bridge, half: int, n_seqs: int, seed: int, fwd_hooks=()) -> dict[str, Tensor]:
    """On repeated sequences of half-length L: per head [n_layers, n_heads],
    induction = mean attention from position i >= L to i - L + 1 (the token after the earlier
    copy of the current one); previous = mean attention from i >= 1 to i - 1."""
    tokens = repeated_tokens(n_seqs, half, bridge.cfg.d_vocab, torch.Generator().manual_seed(seed), bridge.device)
    _, cache = bridge.run_with_cache(tokens, names_filter=_pattern_names(bridge), fwd_hooks=fwd_hooks)
    second = torch.arange(half, 2 * half)
    later = torch.arange(1, 2 * half)
    induction, previous = [], []
    for name in _pattern_names(bridge):
        pattern = cache[name].float()  # [batch, head, query_pos, key_pos]
        induction.append(pattern[:, :, second, second - half + 1].mean((0, 2)))
        previous.append(pattern[:, :, later, later - 1].mean((0, 2)))
    return {"induction": torch.stack(induction), "previous": torch.stack(previous), "pattern_example": cache}


@torch.no_grad()
def half_losses(bridge: Bridge, half: int, n_seqs: int, seed: int, fwd_hooks=()) -> tuple[float, float]:
    """Mean next-token loss predicting the first half (random: ~log d_vocab) and the repeated
    second half (copyable: near 0 with induction heads)."""
    tokens = repeated_tokens(n_seqs, half, bridge.cfg.d_vocab, torch.Generator().manual_seed(seed), bridge.device)
    logits = bridge.run_with_hooks(tokens, fwd_hooks=fwd_hooks)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    nll = nll.view(n_seqs, 2 * half - 1)
    return nll[:, : half - 1].mean().item(), nll[:, half:].mean().item()


@torch.no_grad()
def copying_scores(bridge: Bridge) -> Tensor:
    """[n_layers, n_heads]: Re(sum of eigenvalues) / sum |eigenvalues| of each head's full OV
    circuit W_E W_V W_O W_U, kept factored: +1 for a head that copies tokens, -1 for one that
    suppresses them (A Mathematical Framework's positive-eigenvalue measure)."""
    tl = tl_weights(bridge.params, bridge.cfg)
    scores = []
    for layer in range(bridge.cfg.n_layers):
        ov = FactoredMatrix(bridge.W_V[layer], bridge.W_O[layer])  # [n_heads, d_model, d_model]
        full = FactoredMatrix(tl["embed.W_E"], ov.A) @ FactoredMatrix(ov.B, tl["unembed.W_U"])
        eig = full.eigenvalues  # [n_heads, mdim] complex
        scores.append(eig.sum(-1).real / eig.abs().sum(-1))
    return torch.stack(scores).float()


@torch.no_grad()
def k_composition(bridge: Bridge) -> Tensor:
    """[n_layers, n_heads, n_layers, n_heads]: how much each head's output feeds each later
    head's keys."""
    return all_composition_scores(bridge.params, bridge.cfg, "K").float()


@torch.no_grad()
def random_k_composition(bridge: Bridge, seed: int, samples: int = 64) -> float:
    """The K-composition score of Gaussian weights of the same shapes: what composition scores
    read when nothing composes (they are not zero for random matrices)."""
    cfg, generator = bridge.cfg, torch.Generator().manual_seed(seed)

    def gaussian(*shape):
        return torch.randn(samples, *shape, generator=generator)

    ov = FactoredMatrix(gaussian(cfg.d_model, cfg.d_head), gaussian(cfg.d_head, cfg.d_model))
    qk_t = FactoredMatrix(gaussian(cfg.d_model, cfg.d_head), gaussian(cfg.d_head, cfg.d_model))
    return composition_scores(ov, qk_t, broadcast_dims=False).mean().item()


def zero_heads_hook(heads: list[tuple[int, int]]):
    """fwd_hooks that zero-ablate hook_z of the given (layer, head) pairs."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def ablate(z: Tensor, hook) -> Tensor:  # [batch, pos, head, d_head]
        keep = torch.ones(z.shape[-2], device=z.device, dtype=z.dtype)
        keep[by_layer[hook.layer()]] = 0
        return z * keep[:, None]

    return [(f"blocks.{layer}.attn.hook_z", ablate) for layer in by_layer]


def gradient_norms(bridge: Bridge, n_seqs: int, half: int, seed: int) -> list[float]:
    """Global gradient norm of each sequence's loss, all sequences at once through vmap."""
    tokens = repeated_tokens(n_seqs, half, bridge.cfg.d_vocab, torch.Generator().manual_seed(seed), bridge.device)
    grads = per_example_grads(bridge.params, bridge.cfg, tokens)
    squared = sum(g.flatten(1).float().pow(2).sum(1) for g in grads.values())  # [n_seqs]
    return squared.sqrt().tolist()


@dataclass
class EvalSettings:
    seen_lengths: tuple[int, ...] = (8, 12, 20)
    unseen_lengths: tuple[int, ...] = (5, 28)
    n_seqs: int = 64
    seed: int = 1234
    induction_threshold: float = 0.4
    previous_threshold: float = 0.3


def interpret(bridge: Bridge, settings: EvalSettings) -> dict:
    """All figures of the report, as plain Python values (JSON-ready), plus the patterns for plots."""
    lengths = settings.seen_lengths + settings.unseen_lengths
    per_length = {half: pattern_scores(bridge, half, settings.n_seqs, settings.seed + half) for half in lengths}
    induction = torch.stack([per_length[h]["induction"] for h in lengths]).mean(0)  # [n_layers, n_heads]
    induction_unseen = torch.stack([per_length[h]["induction"] for h in settings.unseen_lengths]).mean(0)
    previous = torch.stack([per_length[h]["previous"] for h in lengths]).mean(0)
    n_layers, n_heads = induction.shape
    heads = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
    induction_heads = [h for h in heads if h[0] > 0 and induction_unseen[h] >= settings.induction_threshold]
    previous_heads = [h for h in heads if previous[h] >= settings.previous_threshold and h not in induction_heads]
    probe = settings.seen_lengths[len(settings.seen_lengths) // 2]
    first_half, second_half = half_losses(bridge, probe, settings.n_seqs, settings.seed)
    figures: dict = {
        "lengths_seen": list(settings.seen_lengths),
        "lengths_unseen": list(settings.unseen_lengths),
        "induction_score": induction.tolist(),
        "induction_score_unseen": induction_unseen.tolist(),
        "induction_score_by_length": {h: per_length[h]["induction"].tolist() for h in lengths},
        "previous_token_score": previous.tolist(),
        "induction_heads": [list(h) for h in induction_heads],
        "previous_token_heads": [list(h) for h in previous_heads],
        "copying_score": copying_scores(bridge).tolist(),
        "loss_first_half": first_half,
        "loss_repeated_half": second_half,
        "loss_chance": float(torch.log(torch.tensor(float(bridge.cfg.d_vocab)))),
        "per_example_grad_norms": gradient_norms(bridge, 4, probe, settings.seed),
    }
    if induction_heads and previous_heads:
        k_comp = k_composition(bridge)
        figures["k_composition"] = {
            f"{p[0]}.{p[1]}->{i[0]}.{i[1]}": k_comp[p[0], p[1], i[0], i[1]].item()
            for p in previous_heads for i in induction_heads if p[0] < i[0]
        }  # fmt: skip
        figures["k_composition_random_baseline"] = random_k_composition(bridge, settings.seed)
        ablation = zero_heads_hook(previous_heads)
        ablated = torch.stack(
            [pattern_scores(bridge, h, settings.n_seqs, settings.seed + h, ablation)["induction"] for h in settings.unseen_lengths]
        ).mean(0)
        figures["ablation"] = {
            "zeroed_heads": [list(h) for h in previous_heads],
            "induction_score_unseen": {f"{l}.{h}": ablated[l, h].item() for l, h in induction_heads},
            "loss_repeated_half": half_losses(bridge, probe, settings.n_seqs, settings.seed, ablation)[1],
        }
    figures["_pattern"] = None
    if induction_heads:
        best = max(induction_heads, key=lambda h: induction_unseen[h])
        cache = per_length[probe]["pattern_example"]
        figures["_pattern"] = (best, probe, cache[f"blocks.{best[0]}.attn.hook_pattern"][0, best[1]].float().cpu())
    return figures
