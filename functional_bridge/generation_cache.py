"""What generation hands back besides tokens: an activation cache of the generated sequence, and
the prompt given as embeddings. Both are per-step hooks on generate's own forwards.

An activation cache without a second forward: generate's cached forwards see the prompt once
and then one new token each (and, with ``feed_last_token``, the last sampled token too), so
hooks on them capture every position of the final sequence once. ``GenerationRecorder`` hands
out each step's capturing hooks and ``assemble``s the steps into what ``run_with_cache`` on the
final sequence (same mask) returns: activations joined on their position axis; attention
scores and patterns ``[batch, head, query, key]`` stacked on the query axis, with the keys a
step could not see yet (later positions) filled as the uncached forward's causal mask fills
them (score -inf, pattern 0). Without the KV cache every step runs the whole sequence, and the
last step's captures are the cache.

A prompt as embeddings (TransformerLens's ``generate(input=embeds)``): ``PromptEmbeddings``
replaces the ``hook_embed`` activation of the prompt's positions (placeholder token ids) with
the given ``[batch, pos, d_model]`` tensor, before any other hook there sees it. ``hook_embed``
is what TransformerLens's ``model.embed(tokens)`` returns (W_E rows, scaled or normed as the
family says), so embedding the tokens and generating from that equals generating from them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .config import BridgeConfig
from .hooks import NO_HOOKS
from .params import Params

_QUERY_KEY = ("hook_attn_scores", "hook_pattern")  # [batch, head, query, key]
# hooks whose rows flatten [batch, pos, ...] (per-head norms, mixture-of-experts routing)
_FLAT_ROWS = (".q_norm.", ".k_norm.", ".mlp.experts.", ".mlp.hook_expert_")


def position_layout(name: str, first: Tensor, batch: int, n_first: int) -> str:
    """How a hook's activation holds positions, told by its name and its first step's shape
    (n_first positions): "query_key" ([batch, head, query, key]), "rows" (a first axis of
    batch * pos * k rows in [batch, pos] order: per-head q/k norms, expert routing) or "pos"
    (axis 1; also a q/k norm over the whole projection, OLMo 2's, [batch, pos, ...])."""
    if name.rsplit(".", 1)[-1] in _QUERY_KEY:
        return "query_key"
    if any(part in name for part in _FLAT_ROWS) and tuple(first.shape[:2]) != (batch, n_first):
        return "rows"
    return "pos"


class GenerationRecorder:
    """Captures the named hooks on each forward of a generation and joins them into one cache.

    Call ``step_hooks()`` once per forward, in order (it opens that step's captures); with
    ``cached=False`` each step runs the whole sequence and replaces the previous one's."""

    def __init__(self, names: Sequence[str], cached: bool, detach: bool = True):
        self.names = list(names)
        self.cached = cached
        self.detach = detach
        self.steps: list[dict[str, Tensor]] = []

    def step_hooks(self) -> list[tuple[str, Callable]]:
        """[(name, fn)] capturing this step's activations at every recorded name."""
        captured: dict[str, Tensor] = {}
        if self.cached:
            self.steps.append(captured)
        else:
            self.steps = [captured]

        def save(activation: Tensor, hook) -> None:
            captured[hook.name] = activation.detach() if self.detach else activation

        return [(name, save) for name in self.names]

    def assemble(self, batch: int, step_lengths: Sequence[int]) -> dict[str, Tensor]:
        """{name: activation over the whole sequence}, in the recorded names' order. step_lengths:
        each step's number of new positions (the prompt's length, then 1 per token)."""
        if not self.steps:
            return {}
        if not self.cached or len(self.steps) == 1:
            return {name: self.steps[-1][name] for name in self.names if name in self.steps[-1]}
        if len(step_lengths) != len(self.steps):
            raise ValueError(f"{len(self.steps)} steps recorded but {len(step_lengths)} step lengths given")
        total = sum(step_lengths)
        cache = {}
        for name in self.names:
            parts = [step[name] for step in self.steps if name in step]
            if not parts:
                continue
            if len(parts) != len(self.steps):
                raise RuntimeError(f"hook {name!r} ran on {len(parts)} of {len(self.steps)} generation steps")
            cache[name] = _join(name, parts, batch, step_lengths, total)
        return cache


def _join(name: str, parts: list[Tensor], batch: int, step_lengths: Sequence[int], total: int) -> Tensor:
    layout = position_layout(name, parts[0], batch, step_lengths[0])
    if layout == "pos":
        return torch.cat(parts, dim=1)
    if layout == "rows":  # [batch * new * k, ...] -> [batch, new, k, ...], joined on new
        blocks = [p.reshape(batch, n, -1, *p.shape[1:]) for p, n in zip(parts, step_lengths)]
        joined = torch.cat(blocks, dim=1)
        return joined.reshape(-1, *joined.shape[3:])
    fill = float("-inf") if name.endswith("hook_attn_scores") else 0.0  # a key the query cannot see
    padded = [torch.nn.functional.pad(p, (0, total - p.shape[-1]), value=fill) for p in parts]  # [batch, head, new, total]
    return torch.cat(padded, dim=-2)


class PromptEmbeddings:
    """Makes a generation's prompt the given embeddings: wraps each step's hooks so that the
    prompt positions' ``hook_embed`` is embeds [batch, pos, d_model] (placeholder token ids stand
    in for them). Call ``wrap(hooks)`` once per forward, in order: with the KV cache only the
    first forward holds the prompt; without it every forward does, at positions [0, pos)."""

    def __init__(self, embeds: Tensor, cached: bool):
        self.embeds = embeds
        self.cached = cached
        self.calls = 0

    def holds_prompt(self) -> bool:
        """Whether the next forward (the next wrap) runs the prompt's positions."""
        return not self.cached or self.calls == 0

    def wrap(self, hooks):
        replace = self.holds_prompt()
        self.calls += 1
        return _EmbedsFirst(hooks, self.embeds) if replace else hooks


class _EmbedsFirst:
    """A HookSet's interface (wants, __call__): hook_embed's prompt positions become embeds, then
    the wrapped hooks run as they would."""

    def __init__(self, inner, embeds: Tensor):
        self.inner = NO_HOOKS if inner is None else inner
        self.embeds = embeds

    def wants(self, name: str | None) -> bool:
        return name == "hook_embed" or self.inner.wants(name)

    def __bool__(self) -> bool:
        return True

    def __call__(self, name: str | None, activation: Tensor) -> Tensor:
        if name == "hook_embed":
            n = self.embeds.shape[1]
            activation = torch.cat([self.embeds.to(activation.dtype), activation[:, n:]], dim=1)
        return self.inner(name, activation)


def token_embeddings(params: Params, tokens: Tensor, cfg: BridgeConfig) -> Tensor:
    """[batch, pos, d_model]: the ``hook_embed`` activation of tokens [batch, pos] (what
    TransformerLens's ``model.embed(tokens)`` returns), no hooks run."""
    from .model import run_with_cache

    return run_with_cache(params, tokens, cfg, names_filter="hook_embed", stop_at_layer=0)[1]["hook_embed"]


def check_prompt_embeddings(embeds: Tensor, cfg: BridgeConfig, dtype: torch.dtype, device) -> Tensor:
    """embeds as [batch, pos, d_model] on the params' device and dtype, or a clear error."""
    if embeds.dim() == 2:
        embeds = embeds[None]
    if embeds.dim() != 3 or embeds.shape[-1] != cfg.d_model:
        raise ValueError(f"embeddings as input must be [batch, pos, d_model={cfg.d_model}], got {tuple(embeds.shape)}")
    if embeds.shape[1] == 0:
        raise ValueError("embeddings as input have no positions")
    return embeds.to(device=device, dtype=dtype)


def generate_with_cache(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    names_filter=None,
    hooks=None,
    optional_hooks: Sequence[str] = (),
    use_past_kv_cache: bool = True,
    detach: bool = True,
    **generate_kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(generate_tokens' output, cache): cache maps each hook name names_filter selects (a name,
    a list, a predicate or None, as run_with_cache's) to its activation over the whole returned
    sequence, after the hooks passed, as run_with_cache on that sequence with the same mask and
    hooks gives it, assembled from the generation's own forwards plus one step for the last
    token. generate_kwargs: generate_tokens' (attention_mask, max_new_tokens, do_sample ...)."""
    from .generate import generate_tokens
    from .hooks import HookSet, resolve_hooks, select_names

    if generate_kwargs.get("make_hooks") is not None:
        raise TypeError("generate_with_cache builds each step's hooks itself: pass hooks=, not make_hooks=")
    recorder = GenerationRecorder(select_names(cfg, names_filter, optional_hooks), use_past_kv_cache, detach)
    base = resolve_hooks(cfg, hooks, (), optional_hooks)

    def make_hooks(step_tokens):
        table: dict[str, list] = {}
        for name, fn in recorder.step_hooks():
            table.setdefault(name, []).append(fn)
        return base.combined(HookSet(table))

    out = generate_tokens(params, tokens, cfg, optional_hooks=optional_hooks, use_past_kv_cache=use_past_kv_cache,
                          make_hooks=make_hooks, feed_last_token=True, **generate_kwargs)  # fmt: skip
    return out, recorder.assemble(*prompt_steps(tokens, len(recorder.steps)))


def prompt_steps(tokens: Tensor, n_steps: int) -> tuple[int, list[int]]:
    """(batch, new positions per forward) of a cached generation from tokens [batch, pos]
    (or [pos]): the prompt, then one token a step."""
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    return tokens.shape[0], [tokens.shape[1]] + [1] * (n_steps - 1)
