"""The pure API of a model with SAEs spliced in: forward_with_saes, run_with_cache_with_saes and
activation_grads_with_saes take the params, the tokens, the config and the SAEs (fb.sae.SAE or
sae_lens SAEs) and hold nothing, so they compose with vmap and grad: several SAEs stacked, K
feature edits as a worlds axis (features.py). The Bridge's *_with_saes methods are these plus
the facade's state. Hook names are the spliced model's (splice.spliced_names)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad

from ..config import BridgeConfig
from ..func import detached
from ..hooks import HookSet
from ..model import check_inputs, transformer
from ..params import Params
from .sae import SAE, as_sae
from .splice import SAE_FLAG, Splice, SplicedHooks, check_splices, select_spliced


def _splices(cfg: BridgeConfig, saes, use_error_term: bool, exclude: Tensor | None) -> list[Splice]:
    saes = [saes] if not isinstance(saes, (list, tuple)) else saes
    splices = [Splice(as_sae(s), use_error_term, exclude) for s in saes]
    check_splices(cfg, splices)
    return splices


def spliced_hooks(cfg: BridgeConfig, splices: Sequence[Splice], hooks=(), optional: Sequence[str] = ()) -> SplicedHooks:
    """The SplicedHooks for one call: ``hooks`` ([(name or predicate, fn)]) resolved against the
    spliced model's names."""
    outputs = [s.sae.cfg.output_hook for s in splices]
    table: dict[str, list] = {}
    for name_or_filter, fn in hooks or ():
        for name in select_spliced(cfg, outputs, name_or_filter, (*optional, SAE_FLAG)):
            table.setdefault(name, []).append(fn)
    return SplicedHooks(HookSet(table), splices)


def forward_with_saes(
    params: Params, tokens: Tensor, cfg: BridgeConfig, saes: SAE | Sequence[SAE], *, use_error_term: bool = False,
    hooks=(), attention_mask: Tensor | None = None, exclude: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Logits [batch, pos, d_vocab] with the SAEs spliced in. exclude: bool [batch, pos], True
    where the SAEs are bypassed (HookedSAETransformer's exclude_special_tokens)."""
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    hookset = spliced_hooks(cfg, _splices(cfg, saes, use_error_term, exclude), hooks)
    return transformer(params, tokens, cfg, attention_mask, hookset)


def run_with_cache_with_saes(
    params: Params, tokens: Tensor, cfg: BridgeConfig, saes: SAE | Sequence[SAE], *, names_filter=None,
    use_error_term: bool = False, hooks=(), attention_mask: Tensor | None = None, exclude: Tensor | None = None,
    detach: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """(logits, cache) with the SAEs spliced in; the cache holds the names names_filter selects
    among the spliced model's (the SAEs' hook_sae_* names, blocks.L.mlp.hook_in), in execution order."""
    tokens, attention_mask = check_inputs(params, tokens, cfg, attention_mask)
    splices = _splices(cfg, saes, use_error_term, exclude)
    cache: dict[str, Tensor] = {}

    def save(x: Tensor, hook) -> None:
        cache[hook.name] = x.detach() if detach else x

    names = select_spliced(cfg, [s.sae.cfg.output_hook for s in splices], names_filter, (SAE_FLAG,))
    logits = transformer(params, tokens, cfg, attention_mask, spliced_hooks(cfg, splices, [*hooks, (names, save)] if names else hooks))
    return logits, cache


def activation_grads_with_saes(
    params: Params, tokens: Tensor, cfg: BridgeConfig, saes: SAE | Sequence[SAE], metric: Callable[[Tensor], Tensor],
    names: str | Sequence[str], *, use_error_term: bool = True, attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:  # fmt: skip
    """fb.activation_grads over the spliced model: d metric(logits) / d activation at each named
    hook (``H.hook_sae_acts_post``: feature attribution), by torch.func.grad of a zero
    perturbation, no backward hooks. With the error term (the default) the gradients are those
    of the original model's output."""
    names = [names] if isinstance(names, str) else list(names)
    with torch.no_grad():
        _, cache = run_with_cache_with_saes(params, tokens, cfg, saes, names_filter=names, use_error_term=use_error_term,
                                            attention_mask=attention_mask)  # fmt: skip
    params = detached(params)
    saes = [saes] if not isinstance(saes, (list, tuple)) else saes
    saes = [SAE(detached(s.params), s.cfg) for s in map(as_sae, saes)]

    def perturbed(deltas: dict[str, Tensor]) -> Tensor:
        hooks = [(name, lambda x, hook: x + deltas[hook.name]) for name in names]
        return metric(forward_with_saes(params, tokens, cfg, saes, use_error_term=use_error_term, hooks=hooks,
                                        attention_mask=attention_mask))  # fmt: skip

    return grad(perturbed)({name: torch.zeros_like(cache[name]) for name in names})
