"""Bridge: the nn.Module users hold. Thin: every method delegates to the pure layer.

The module tree mirrors HF's names (``transformer.h.0.attn.c_attn``...) with plain containers
that register the HF model's own Parameter objects, in HF's order. ``bridge.params`` is read
live from that tree, so ``torch.func.functional_call(bridge, params, ...)``, optimizers,
``load_state_dict`` and ``to()`` all act on the one copy of the truth, and the TL view
(``tl_parameters()``, ``W_Q``...) is recomputed from it on every access.

HookedTransformer's interface (forward's TL arguments, text, the stateful hook API, run_with_cache,
``bridge.cfg``'s TL fields, ``bridge.blocks[i]`` views) comes from the TLFacade mixin
(``tl_compat/``), which keeps TL's model state on the facade and passes it to the pure functions.
"""

from __future__ import annotations

import copy
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .analysis import FactoredMatrix, all_composition_scores, ov_circuit, qk_circuit
from .architectures import config_from_hf, family_for, hf_architecture
from .config import BridgeConfig
from .hf_io import build_hf_model, describe_leaves, hf_class, hf_params, load_hf_model
from .hooks import hook_names
from .params import ParamsStructureError, check_params, params_dtype, refuse_sharded
from .placement import input_device
from .sae.facade import SAEFacade
from .tl_compat import TLFacade
from .tl_compat.config import plain_config
from .tl_compat.views import ROOT_VIEWS, TLContainer
from .weights import GLOBAL_WEIGHTS, LAYER_WEIGHTS, stacked_tl_weight, tl_weights


class Bridge(SAEFacade, TLFacade, nn.Module):
    """An HF causal LM (or BERT encoder) as one pytree of HF leaves, with TransformerLens's view of it."""

    def __init__(self, params: Mapping[str, Tensor], cfg: BridgeConfig, hf_config=None, tokenizer=None,
                 default_prepend_bos: bool | None = None, default_padding_side: str | None = None):  # fmt: skip
        super().__init__()
        cfg = plain_config(cfg)
        check_params(params, cfg)
        input_device(params, cfg)  # one device, or whole blocks placed on devices (placement.py)
        self.cfg = cfg
        self._hf_config = hf_config
        for name, tensor in params.items():
            _register_leaf(self, name, tensor)
        self.register_state_dict_post_hook(_add_tied_aliases)
        self._init_tl(tokenizer, default_prepend_bos, default_padding_side)

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, model: nn.Module, tokenizer=None, **tl_defaults) -> "Bridge":
        """Adopt an HF model's own tensors (zero copy): training either trains both. The model's
        class decides the family (not ``config.architectures``, which may name another class).
        tokenizer: an HF tokenizer for the text methods; tl_defaults: default_prepend_bos (None:
        as HookedTransformer for this architecture), default_padding_side."""
        cfg = config_from_hf(model.config, architecture=type(model).__name__)
        return cls(hf_params(model), cfg, copy.deepcopy(model.config), tokenizer, **tl_defaults)

    @classmethod
    def from_config(cls, hf_config, seed: int = 0, tokenizer=None, **tl_defaults) -> "Bridge":
        """A randomly initialised model (HF's own init, seeded) from an HF config."""
        architecture = hf_architecture(hf_config)
        config_from_hf(hf_config, architecture)  # refuse unsupported configs before building anything
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = hf_class(architecture)._from_config(hf_config)
        return cls.from_hf(model, tokenizer, **tl_defaults)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype | None = None, device=None, tokenizer=None,
                        **tl_defaults) -> "Bridge":  # fmt: skip
        """HF's from_pretrained (a hub name or a local directory), adopted, with the tokenizer
        saved beside it (AutoTokenizer.from_pretrained; none if there is none to load) unless
        one is given."""
        model = load_hf_model(name_or_path, dtype=dtype, device=device)
        return cls.from_hf(model, tokenizer if tokenizer is not None else load_tokenizer(name_or_path), **tl_defaults)

    def to_hf(self) -> nn.Module:
        """An HF model holding this bridge's current tensors (shared, not copied)."""
        if self._hf_config is None:
            raise ValueError("this Bridge was built without an HF config, so it cannot make an HF model")
        refuse_sharded(self.params, "to_hf (functional_bridge.distributed.export_hf gathers a sharded bridge)")
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
        """HF name -> leaf, in HF order: the only state. Read live from the module tree: each
        leaf is looked up in its container's ``_parameters`` now (where functional_call, to()
        and load_state_dict(assign=True) put theirs); only where the leaves sit is remembered,
        which saves named_parameters()'s walk of the tree on every forward."""
        slots = self.__dict__.get("_leaf_slots")
        if slots is None:
            slots = self.__dict__["_leaf_slots"] = _leaf_slots(self)
        return {name: module._parameters[leaf] for name, module, leaf in slots}

    @property
    def dtype(self) -> torch.dtype:
        return params_dtype(self.params)

    def _register_leaf(self, name: str, tensor: Tensor) -> None:
        _register_leaf(self, name, tensor)

    @property
    def device(self) -> torch.device:
        """The leaves' device; for leaves placed by layer, the embedding's (where inputs go)."""
        return input_device(self.params, self.cfg)

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
        processed = Bridge(leaves, self.cfg, copy.deepcopy(self._hf_config))
        processed.tokenizer, processed._tl = self.tokenizer, copy.copy(self._tl)
        processed._weights_processed = True
        return processed

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


def _leaf_slots(root: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(HF name, container module, attribute) of each leaf, in named_parameters() order."""
    containers = dict(root.named_modules())
    slots = []
    for name, _ in root.named_parameters():
        path, _, leaf = name.rpartition(".")
        slots.append((name, containers[path], leaf))
    return slots


def _register_leaf(root: nn.Module, name: str, tensor: Tensor) -> None:
    """Register tensor under its dotted HF name, creating plain container modules on the way."""
    root.__dict__.pop("_leaf_slots", None)  # where the leaves sit changes
    *path, leaf = name.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None and module is root and part in ROOT_VIEWS:  # "unembed.b_U": also TL's view
            child = module._modules[part] = TLContainer(root, part)  # (add_module refuses the name)
        elif child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    module.register_parameter(leaf, tensor)


def load_tokenizer(name_or_path: str):
    """The HF tokenizer saved with a model, or None if there is none to load."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _add_tied_aliases(module: Bridge, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: include HF's tied aliases (lm_head.weight) as torch does for tied modules."""
    for alias, target in family_for(module.cfg).tied_aliases(module.cfg).items():
        if prefix + alias not in state_dict and prefix + target in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + target]
