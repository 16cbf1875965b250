"""SAEFacade: HookedSAETransformer's (SAELens 6.54) SAE API on the Bridge, mixed in before
TLFacade: add_sae, reset_saes, the saes() context, run_with_saes, run_with_cache_with_saes,
run_with_hooks_with_saes, acts_to_saes.

The Bridge keeps which SAEs are attached (by input hook, as SAELens) and, on every forward,
passes them to the pure forward as one more layer of hooks (splice.SplicedHooks). While SAEs are
attached, and inside the *_with_saes methods, the hook names are the spliced model's
(splice.spliced_names): every hook API of the facade (add_hook, run_with_hooks, run_with_cache,
hook_dict) sees ``H.hook_sae_acts_post`` and friends, and ``blocks.L.mlp.hook_in``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from ..hooks import HookSet
from .sae import SAE, as_sae
from .splice import SAE_FLAG, Splice, SplicedHooks, check_splices, select_spliced, spliced_names

_SPECIAL_TOKEN_ATTRS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")


class Attached(NamedTuple):
    sae: SAE
    use_error_term: bool
    exclude_special_tokens: bool | list[int]
    original: object  # what the user passed (a sae_lens SAE is given back by acts_to_saes)


class SAEFacade:
    # state --------------------------------------------------------------------------------------

    @property
    def _attached(self) -> dict[str, Attached]:
        return self.__dict__.setdefault("_sae_attached", {})

    @property
    def _sae_mode(self) -> bool:
        return bool(self._attached) or self.__dict__.get("_sae_depth", 0) > 0

    @property
    def acts_to_saes(self) -> dict:
        """Input hook name -> the attached SAE (as it was passed to add_sae)."""
        return {name: a.original for name, a in self._attached.items()}

    def _output_hooks(self) -> list[str]:
        return [a.sae.cfg.output_hook for a in self._attached.values()]

    def _names_changed(self) -> None:
        self._registry.extra_names = frozenset(spliced_names(self._config, self._output_hooks(), OPTIONAL_ALL))
        self._registry._hookset = None

    def _select_names(self, name_or_filter, optional=None):
        if not self._sae_mode:
            return super()._select_names(name_or_filter, optional)
        flags = (*(self._optional_flags() if optional is None else optional), SAE_FLAG)
        return select_spliced(self._config, self._output_hooks(), name_or_filter, flags)

    # attaching ----------------------------------------------------------------------------------

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False) -> None:
        """Attach an SAE or transcoder (an fb.sae.SAE or a sae_lens SAE) until reset_saes,
        replacing any SAE attached at the same input hook. use_error_term=None takes a sae_lens
        SAE's own setting (False for ours). exclude_special_tokens: True bypasses the SAE at the
        tokenizer's BOS/EOS/PAD/SEP/decoder-start tokens; a list gives the ids. Unknown hooks are
        an error here (SAELens logs a warning and skips)."""
        ours = as_sae(sae)
        if use_error_term is None:
            use_error_term = bool(getattr(sae, "use_error_term", False))
        name = ours.cfg.hook_name
        others = [Splice(a.sae) for n, a in self._attached.items() if n != name]
        check_splices(self._config, [*others, Splice(ours)])
        self._attached[name] = Attached(ours, bool(use_error_term), exclude_special_tokens, sae)
        self._names_changed()

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Detach the SAEs at these input hooks (all by default)."""
        names = [act_names] if isinstance(act_names, str) else list(self._attached) if act_names is None else act_names
        for name in names:
            self._attached.pop(name, None)
        self._names_changed()

    @contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens: bool | list[int] = False):  # fmt: skip
        """SAEs attached for a with block; on exit those it added are removed and any SAE they
        displaced is restored (unless reset_saes_end=False)."""
        saes = [saes] if not isinstance(saes, (list, tuple)) else list(saes)
        restore = []
        self.__dict__["_sae_depth"] = self.__dict__.get("_sae_depth", 0) + 1
        try:
            for sae in saes:
                name = as_sae(sae).cfg.hook_name
                restore.append((name, self._attached.get(name)))
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
            yield self
        finally:
            self.__dict__["_sae_depth"] -= 1
            if reset_saes_end:
                for name, previous in reversed(restore):
                    self._attached.pop(name, None)
                    if previous is not None:
                        self._attached[name] = previous
            self._names_changed()

    # running -------------------------------------------------------------------------------------

    def run_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
                      exclude_special_tokens: bool | list[int] = False, **model_kwargs):  # fmt: skip
        """forward(*model_args, **model_kwargs) with these SAEs attached for the call."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None,
                                 exclude_special_tokens: bool | list[int] = False, return_cache_object: bool = True,
                                 remove_batch_dim: bool = False, **kwargs):  # fmt: skip
        """run_with_cache with these SAEs attached: the cache holds the spliced model's hooks."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(*model_args, return_cache_object=return_cache_object, remove_batch_dim=remove_batch_dim, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 exclude_special_tokens: bool | list[int] = False, fwd_hooks=(), bwd_hooks=(),
                                 reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs):  # fmt: skip
        """run_with_hooks with these SAEs attached; hooks may name the SAEs' hook points."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end,
                                       clear_contexts=clear_contexts, **model_kwargs)  # fmt: skip

    def forward(self, input, *args, **kwargs):
        """TLFacade.forward, with the attached SAEs' special-token masks computed from the input
        (text is tokenized as the forward will)."""
        if not self._excluding():
            return super().forward(input, *args, **kwargs)
        tokens = input if isinstance(input, Tensor) else self._tokenize(input, kwargs.get("prepend_bos"), kwargs.get("padding_side"))[0]
        with self._exclusions(tokens):
            return super().forward(input, *args, **kwargs)

    def _generation_hooks(self, hooks, step_tokens: Tensor):
        """One generation step's hooks, the attached SAEs bypassed at special tokens of step_tokens
        [batch, new] as forward bypasses them (a placeholder id -1 is no token)."""
        with self._exclusions(step_tokens):
            return super()._generation_hooks(hooks, step_tokens)

    def _excluding(self) -> list:
        """The attached SAEs bypassed at some tokens (exclude_special_tokens set)."""
        return [a for a in self._attached.values() if a.exclude_special_tokens is not False]

    @contextmanager
    def _exclusions(self, tokens: Tensor):
        """While open, the splices read each excluding SAE's bypass mask over tokens [batch, pos]."""
        wanting = self._excluding()
        if not wanting:
            yield
            return
        self.__dict__["_sae_masks"] = {id(a): self._exclusion_mask(tokens, a.exclude_special_tokens) for a in wanting}
        try:
            yield
        finally:
            self.__dict__.pop("_sae_masks", None)

    def _exclusion_mask(self, tokens: Tensor, exclude: bool | list[int]) -> Tensor:
        """bool [batch, pos] (as tokens): True at the tokens the SAE is bypassed at."""
        if isinstance(exclude, (list, tuple)):
            ids = list(exclude)
        elif self.tokenizer is None:
            raise ValueError("exclude_special_tokens=True needs a tokenizer on the Bridge; pass a list of token ids instead")
        else:
            ids = sorted({i for attr in _SPECIAL_TOKEN_ATTRS if (i := getattr(self.tokenizer, attr, None)) is not None})
        tokens = tokens if tokens.dim() == 2 else tokens[None]
        return torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))

    def _call_hooks(self, hooks=None):
        """The registered and per-call hooks, with the attached SAEs spliced in."""
        if not self._sae_mode:
            return super()._call_hooks(hooks)
        registered = self._registry.hookset()
        extra = HookSet(_table(self, hooks)) if hooks is not None and not isinstance(hooks, HookSet) else (hooks or HookSet())
        inner = extra if registered is None else registered.combined(extra)
        masks = self.__dict__.get("_sae_masks", {})
        splices = [Splice(a.sae, a.use_error_term, masks.get(id(a))) for a in self._attached.values()]
        return SplicedHooks(inner, splices) if splices else inner


OPTIONAL_ALL = ("use_attn_in", "use_split_qkv_input", "use_attn_result", "use_hook_mlp_in", SAE_FLAG)


def _table(bridge: SAEFacade, hooks) -> dict:
    table: dict = {}
    for entry in hooks:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise TypeError(f"each hook must be a (name or predicate, fn) pair, got {entry!r}")
        for name in bridge._select_names(entry[0]):
            table.setdefault(name, []).append(entry[1])
    return table
