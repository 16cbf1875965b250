"""Bridge: the nn.Module users hold. Thin: every method delegates to the pure layer.

The module tree mirrors HF's names (``transformer.h.0.attn.c_attn``...) with plain containers
that register the HF model's own Parameter objects, in HF's order. ``bridge.params`` is read
live from that tree, so ``torch.func.functional_call(bridge, params, ...)``, optimizers,
``load_state_dict`` and ``to()`` all act on the one copy of the truth, and the TL view
(``tl_parameters()``, ``W_Q``...) is recomputed from it on every access.
"""

from __future__ import annotations

import copy
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .analysis import ActivationCache, FactoredMatrix, all_composition_scores, ov_circuit, qk_circuit
from .architectures import config_from_hf, family_for, hf_architecture
from .config import BridgeConfig
from .hf_io import build_hf_model, describe_leaves, hf_class, hf_params, load_hf_model
from .hooks import hook_names
from .model import forward, run_with_cache, run_with_hooks
from .params import ParamsStructureError, check_params, params_device, params_dtype
from .weights import GLOBAL_WEIGHTS, LAYER_WEIGHTS, stacked_tl_weight, tl_weights


class Bridge(nn.Module):
    """An HF causal LM (or BERT encoder) as one pytree of HF leaves, with TransformerLens's view of it."""

    def __init__(self, params: Mapping[str, Tensor], cfg: BridgeConfig, hf_config=None):
        super().__init__()
        check_params(params, cfg)
        params_device(params)
        self.cfg = cfg
        self._hf_config = hf_config
        for name, tensor in params.items():
            _register_leaf(self, name, tensor)
        self.register_state_dict_post_hook(_add_tied_aliases)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, model: nn.Module) -> "Bridge":
        """Adopt an HF model's own tensors (zero copy): training either trains both. The model's
        class decides the family (not ``config.architectures``, which may name another class)."""
        cfg = config_from_hf(model.config, architecture=type(model).__name__)
        return cls(hf_params(model), cfg, copy.deepcopy(model.config))

    @classmethod
    def from_config(cls, hf_config, seed: int = 0) -> "Bridge":
        """A randomly initialised model (HF's own init, seeded) from an HF config."""
        architecture = hf_architecture(hf_config)
        config_from_hf(hf_config, architecture)  # refuse unsupported configs before building anything
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = hf_class(architecture)._from_config(hf_config)
        return cls.from_hf(model)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, device=None) -> "Bridge":
        """HF's from_pretrained (a hub name or a local directory), adopted."""
        return cls.from_hf(load_hf_model(name_or_path, dtype=dtype, device=device))

    def to_hf(self) -> nn.Module:
        """An HF model holding this bridge's current tensors (shared, not copied)."""
        if self._hf_config is None:
            raise ValueError("this Bridge was built without an HF config, so it cannot make an HF model")
        return build_hf_model(self.params, self.cfg, self._hf_config)

    @property
    def hf_config(self):
        """The HF config of the current leaves (a new copy per access, None if built without
        one): its class and ``tie_word_embeddings`` follow the leaves, so that
        ``AutoModelForCausalLM.from_config(bridge.hf_config).load_state_dict(bridge.state_dict())``
        rebuilds this model even after an edit or processing untied the head."""
        if self._hf_config is None:
            return None
        return describe_leaves(self._hf_config, self.params, self.cfg)

    # the state --------------------------------------------------------------------------------

    @property
    def params(self) -> dict[str, Tensor]:
        """HF name -> leaf, in HF order: the only state. Read live from the module tree."""
        return dict(self.named_parameters())

    @property
    def dtype(self) -> torch.dtype:
        return params_dtype(self.params)

    @property
    def device(self) -> torch.device:
        return params_device(self.params)

    def load_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True, assign: bool = False):
        """Load HF-keyed tensors. Everything is checked before anything is written, so a bad
        state dict changes nothing. A tied alias (GPT-2's lm_head.weight) may be present if it
        equals the tensor it aliases."""
        own = self.params
        aliases = family_for(self.cfg).tied_aliases(self.cfg)
        problems, missing, unexpected = [], [], []
        for key, value in state_dict.items():
            if not isinstance(value, Tensor):
                problems.append(f"{key} is a {type(value).__name__}, not a tensor")
            elif key in aliases and key not in own:
                source = state_dict.get(aliases[key], own[aliases[key]])
                if not isinstance(source, Tensor):
                    continue  # reported under its own key
                if value.shape != source.shape or not torch.equal(value.to(source.device, source.dtype), source):
                    problems.append(f"{key} must equal {aliases[key]} (they are tied in this model)")
            elif key not in own:
                unexpected.append(key)
            elif tuple(value.shape) != tuple(own[key].shape):
                problems.append(f"{key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        missing = [key for key in own if key not in state_dict]
        if strict and (missing or unexpected):
            problems += [f"missing keys: {missing}"] * bool(missing) + [f"unexpected keys: {unexpected}"] * bool(unexpected)
        if problems:
            raise ParamsStructureError("load_state_dict refused, nothing was changed: " + "; ".join(problems))
        known = {key: value for key, value in state_dict.items() if key in own}
        super().load_state_dict(known, strict=False, assign=assign)
        return _IncompatibleKeys(missing, unexpected)

    # the TransformerLens view -----------------------------------------------------------------

    def tl_parameters(self) -> dict[str, Tensor]:
        """TL name -> differentiable view of the leaves (TransformerLens 3.9's conversion)."""
        return tl_weights(self.params, self.cfg)

    def tl_named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        return iter(self.tl_parameters().items())

    def hook_names(self) -> list[str]:
        return hook_names(self.cfg)

    # circuits ---------------------------------------------------------------------------------

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q W_K^T per head, FactoredMatrix [n_layers, n_heads, d_model, d_model], from the leaves."""
        return qk_circuit(self.params, self.cfg)

    @property
    def OV(self) -> FactoredMatrix:
        """W_V W_O per head, FactoredMatrix [n_layers, n_heads, d_model, d_model], from the leaves."""
        return ov_circuit(self.params, self.cfg)

    def all_composition_scores(self, mode: str) -> Tensor:
        """Q-, K- or V-composition scores between all pairs of heads, [n_layers, n_heads, n_layers,
        n_heads], zero unless the second head's layer is later (as HookedTransformer's)."""
        return all_composition_scores(self.params, self.cfg, mode)

    # running ----------------------------------------------------------------------------------

    def forward(
        self, tokens: Tensor, attention_mask: Tensor | None = None, hooks=None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Logits [batch, pos, d_vocab_out]; same as ``fb.forward(bridge.params, tokens, cfg)``.
        token_type_ids: an encoder's (BERT's) segment ids."""
        return forward(self.params, tokens, self.cfg, attention_mask=attention_mask, hooks=hooks, token_type_ids=token_type_ids)

    def run_with_cache(
        self,
        tokens: Tensor,
        names_filter: str | Sequence[str] | None = None,
        attention_mask: Tensor | None = None,
        fwd_hooks=(),
        detach: bool = True,
        token_type_ids: Tensor | None = None,
    ):
        """(logits, ActivationCache). Detaches the cache by default, as TransformerLens does.
        The cache's analyses read this bridge's parameters when they are called."""
        logits, cache = run_with_cache(
            self.params, tokens, self.cfg, names_filter=names_filter,
            attention_mask=attention_mask, fwd_hooks=fwd_hooks, detach=detach, token_type_ids=token_type_ids,
        )  # fmt: skip
        return logits, ActivationCache(cache, self)

    def run_with_hooks(
        self, tokens: Tensor, fwd_hooks=(), attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        return run_with_hooks(
            self.params, tokens, self.cfg, fwd_hooks=fwd_hooks, attention_mask=attention_mask, token_type_ids=token_type_ids
        )  # fmt: skip

    # processing and TL edits ------------------------------------------------------------------

    def processed(
        self,
        *,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> "Bridge":
        """A new Bridge over ``fb.process_weights(self.params, ...)`` (TransformerLens's options),
        with this bridge's cfg and hf_config; this bridge is untouched."""
        from .processing import process_weights

        with torch.no_grad():
            params = process_weights(
                self.params, self.cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            )  # fmt: skip
        own = self.params
        trainable = any(leaf.requires_grad for leaf in own.values())
        leaves = {
            name: nn.Parameter(value, requires_grad=own[name].requires_grad if name in own else trainable)
            for name, value in params.items()
        }  # fmt: skip
        return Bridge(leaves, self.cfg, copy.deepcopy(self._hf_config))

    def set_tl_weights(self, updates: Mapping[str, Tensor]) -> None:
        """Write TL-named values (``{"blocks.0.attn.W_O": value}``) into the leaves, in place and
        atomically: everything is checked and computed before the first write. An edit that needs
        a new extra leaf (writing a tied W_U unties it into lm_head.weight) registers it; an
        optimizer built earlier does not see a new leaf. See ``fb.set_tl_weights``."""
        from .editing import tl_edit_leaves

        own = self.params
        with torch.no_grad():
            new = tl_edit_leaves(own, self.cfg, updates)  # new tensors (hf_from_tl), no view of a leaf
            trainable = any(leaf.requires_grad for leaf in own.values())
            for name, value in new.items():
                if name in own:
                    own[name].copy_(value)
                else:
                    _register_leaf(self, name, nn.Parameter(value, requires_grad=trainable))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.original_architecture}: n_layers={c.n_layers}, d_model={c.d_model}, n_heads={c.n_heads}"


def _stacked_property(short_name: str) -> property:
    def get(self: Bridge) -> Tensor:
        return stacked_tl_weight(self.params, self.cfg, short_name)

    get.__doc__ = f"HookedTransformer's {short_name}, derived from the leaves on every access."
    return property(get)


for _name in (*LAYER_WEIGHTS, *GLOBAL_WEIGHTS):
    setattr(Bridge, _name, _stacked_property(_name))


def _register_leaf(root: nn.Module, name: str, tensor: Tensor) -> None:
    """Register tensor under its dotted HF name, creating plain container modules on the way."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    module.register_parameter(leaf, tensor)


def _add_tied_aliases(module: Bridge, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: include HF's tied aliases (lm_head.weight) as torch does for tied modules."""
    for alias, target in family_for(module.cfg).tied_aliases(module.cfg).items():
        if prefix + alias not in state_dict and prefix + target in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + target]
