"""Token generation on the pure layer: the sampling rule and the decoding loop over the KV cache.

``generate_tokens(params, tokens, cfg, ...)`` runs the prompt once into a KVCache
(kv_cache.py) and then one token per step against it (or, with use_past_kv_cache=False, the
whole growing sequence each step), with the hooks passed in acting on every step's forward. The
Bridge's TransformerLens-style ``generate`` (tl_compat/generation.py) tokenizes, gathers the
registered hooks and calls this. The loop reads values (argmax, the finished flags) between
steps: it is a driver around pure forwards, not itself a function to vmap.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch
from torch import Tensor

from .config import BridgeConfig
from .kv_cache import decode_step, forward_with_kv_cache
from .model import check_inputs, forward, transformer
from .params import Params


def sample_logits(
    final_logits: Tensor,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    tokens: Tensor | None = None,
    tokens_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TransformerLens's sample_logits: final_logits [batch, d_vocab] -> token ids [batch].
    temperature 0 is greedy. Otherwise logits / temperature, minus freq_penalty times each token's
    count in tokens [batch, pos] (real tokens only, where tokens_mask [batch, pos] is given: TL
    also counts left padding), then top_k or top_p filtering, then one draw of
    torch.multinomial from the softmax in float32 with ``generator``."""
    if temperature == 0.0:
        return final_logits.argmax(-1)
    logits = final_logits / temperature
    if freq_penalty > 0:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens so far (tokens=)")
        weight = torch.ones_like(tokens, dtype=logits.dtype) if tokens_mask is None else tokens_mask.to(logits.dtype)
        counts = torch.zeros_like(logits).scatter_add(-1, tokens, weight)  # [batch, d_vocab]
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        beyond = sorted_logits.softmax(-1).cumsum(-1) > top_p
        beyond = torch.cat([torch.zeros_like(beyond[..., :1]), beyond[..., :-1]], dim=-1)  # keep the token crossing top_p
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), float("-inf"))
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate_tokens(
    params: Params,
    tokens: Tensor,
    cfg: BridgeConfig,
    *,
    attention_mask: Tensor | None = None,
    hooks=None,
    optional_hooks: Collection[str] = (),
    max_new_tokens: int = 10,
    stop_tokens: Sequence[int] = (),
    eos_token_for_padding: int = 0,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    generator: torch.Generator | None = None,
    progress=None,
    return_logits: bool = False,
    make_hooks=None,
    feed_last_token: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """tokens [batch, pos] (left-padded, attention_mask [batch, pos] marking real tokens) ->
    [batch, pos + n_new]: the prompt followed by the generated tokens. A row that produced one of
    stop_tokens gets eos_token_for_padding afterwards; the loop ends when every row has (or after
    max_new_tokens). hooks: a HookSet or ``[(name or predicate, fn)]``, applied to every forward.
    progress: a callable wrapping the step range (a tqdm), or None. return_logits: also return
    each step's final logits [batch, n_new, d_vocab_out] (before sampling's processing).
    make_hooks: a callable giving each step's hooks afresh from the tokens that step's forward
    runs [batch, new] (the Bridge's, whose SAE splices hold per-call state and per-token
    exclusions), used instead of hooks. feed_last_token: also run the last sampled token
    through the model (its logits are dropped), so that the hooks have seen every position of
    the returned sequence (an activation cache of it: generation_cache.py)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if tokens.dim() == 1:
        tokens = tokens[None]
        attention_mask = None if attention_mask is None else attention_mask.reshape(1, -1)
    batch = tokens.shape[0]
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    _check_left_padded(mask)
    if tokens.shape[1] + max_new_tokens > cfg.n_ctx:
        raise ValueError(f"prompt ({tokens.shape[1]}) plus max_new_tokens ({max_new_tokens}) exceed the model's context n_ctx={cfg.n_ctx}")
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=tokens.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    sequence, cache, step_tokens = tokens, None, tokens
    step_mask = mask if bool((~mask).any()) else None  # no padding: the cache's maskless fast path
    step_logits = []
    steps = range(max_new_tokens) if progress is None else progress(range(max_new_tokens))
    for _ in steps:
        if make_hooks is not None:
            hooks = make_hooks(step_tokens if use_past_kv_cache else sequence)
        if use_past_kv_cache:
            if cache is None:  # the prompt, checked; then the loop's own tokens against its own cache
                logits, cache = forward_with_kv_cache(
                    params, step_tokens, cfg, attention_mask=step_mask, hooks=hooks, optional_hooks=optional_hooks, logits_to_keep=1
                )  # fmt: skip
            else:
                logits, cache = decode_step(params, step_tokens, cfg, cache, hooks=hooks, optional_hooks=optional_hooks, logits_to_keep=1)
        else:
            logits = _uncached_forward(params, sequence, cfg, mask, hooks, optional_hooks)
        final = logits[:, -1]  # [batch, d_vocab_out]
        if return_logits:
            step_logits.append(final)
        if do_sample:
            new = sample_logits(final, top_k=top_k, top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
                                tokens=sequence, tokens_mask=mask, generator=generator)  # fmt: skip
        else:
            new = final.argmax(-1)
        if stop.numel():
            new = new.masked_fill(finished, eos_token_for_padding)
            finished = finished | torch.isin(new, stop)
        step_tokens, step_mask = new[:, None], None  # new tokens are real
        sequence, mask = torch.cat([sequence, step_tokens], dim=1), torch.cat([mask, torch.ones_like(step_tokens, dtype=torch.bool)], dim=1)
        if stop.numel() and bool(finished.all()):
            break
    if feed_last_token:
        hooks = make_hooks(step_tokens if use_past_kv_cache else sequence) if make_hooks is not None else hooks
        if use_past_kv_cache:
            forward_with_kv_cache(
                params, step_tokens, cfg, kv_cache=cache, attention_mask=step_mask, hooks=hooks, optional_hooks=optional_hooks
            )  # fmt: skip
        else:
            _uncached_forward(params, sequence, cfg, mask, hooks, optional_hooks)
    if return_logits:
        empty = torch.zeros(batch, 0, cfg.d_vocab_out, dtype=sequence.dtype, device=tokens.device)
        return sequence, torch.stack(step_logits, dim=1) if step_logits else empty
    return sequence


def _uncached_forward(params: Params, tokens: Tensor, cfg: BridgeConfig, mask: Tensor, hooks, optional_hooks) -> Tensor:
    """forward over the whole sequence; hooks may be a HookSet by its interface (an SAE splice)."""
    if not hasattr(hooks, "wants"):
        return forward(params, tokens, cfg, attention_mask=mask, hooks=hooks, optional_hooks=optional_hooks)
    tokens, mask = check_inputs(params, tokens, cfg, mask)
    return transformer(params, tokens, cfg, mask, hooks)


def _check_left_padded(mask: Tensor) -> None:
    """Generation appends on the right: padding must come before each row's real tokens."""
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("generate needs left padding: the attention mask has padding after a real token (right padding?)")
    if not bool(mask[:, -1].all()):
        raise ValueError("generate: a prompt row has no real token")
