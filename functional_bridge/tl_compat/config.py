"""``bridge.cfg``: the model's BridgeConfig, also answering TransformerLens's config fields.

A TLConfig *is* a BridgeConfig (a subclass adding no dataclass field): same fields, hash and
equality among TLConfigs, so ``fb.forward(bridge.params, tokens, bridge.cfg)`` takes it as its
static config, under torch.compile too. It is bound (weakly) to one Bridge, and the fields
TransformerLens code reads that are not architecture are looked up when read:

- ``device`` and ``dtype`` off the leaves, so they cannot go stale after ``to()``, an optimizer
  step or ``load_state_dict`` (a ``torch.device`` and a ``torch.dtype``);
- ``default_prepend_bos``, ``tokenizer_prepends_bos`` and the hook flags ``use_attn_result``,
  ``use_split_qkv_input``, ``use_hook_mlp_in``, ``use_attn_in`` from the Bridge's facade state
  (TLState), which TransformerLens code may also set through the cfg
  (``model.cfg.use_attn_result = True``);
- a few constants HookedTransformerConfig has (``n_devices``, ``attn_only``...).

The architecture fields stay frozen: setting one is an error. ``cfg.plain()`` is the bare
BridgeConfig; pickling or copying a TLConfig gives the bare one too.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch

from ..config import BridgeConfig
from ..params import params_dtype
from ..placement import input_device


@dataclass
class TLState:
    """What a HookedTransformer keeps in its config that is not architecture: per Bridge."""

    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool | None = None  # None until a tokenizer is set
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False


HOOK_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
_BRIDGE_FIELDS = tuple(f.name for f in dataclasses.fields(BridgeConfig))


def plain_config(cfg: BridgeConfig) -> BridgeConfig:
    """The bare BridgeConfig of a config (a TLConfig's fields without its binding)."""
    if type(cfg) is BridgeConfig:
        return cfg
    if not isinstance(cfg, BridgeConfig):
        raise TypeError(f"cfg must be a BridgeConfig, got {type(cfg).__name__}")
    return BridgeConfig(**{name: getattr(cfg, name) for name in _BRIDGE_FIELDS})


class TLConfig(BridgeConfig):
    """A BridgeConfig bound to one Bridge; see the module docstring."""

    @classmethod
    def bind(cls, cfg: BridgeConfig, owner) -> "TLConfig":
        live = object.__new__(cls)
        live.__dict__.update({name: getattr(cfg, name) for name in _BRIDGE_FIELDS})
        object.__setattr__(live, "_owner", weakref.ref(owner))
        return live

    def _bridge(self):
        owner = self.__dict__["_owner"]()
        if owner is None:
            raise ReferenceError("the Bridge this cfg belongs to no longer exists; use cfg.plain()")
        return owner

    def plain(self) -> BridgeConfig:
        return plain_config(self)

    def replace(self, **changes) -> BridgeConfig:
        return self.plain().replace(**changes)

    def __reduce__(self):
        return BridgeConfig, tuple(getattr(self, name) for name in _BRIDGE_FIELDS)

    def __setattr__(self, name, value):
        if name in TLState.__dataclass_fields__:
            bridge = self._bridge()
            if name in HOOK_FLAGS:
                getattr(bridge, "set_" + name)(value)  # bridge.set_use_attn_result(...): checks the value
            else:
                setattr(bridge._tl, name, value)
            return
        if name in ("device", "dtype"):
            raise dataclasses.FrozenInstanceError(f"cfg.{name} is read off the weights: move them with bridge.to(...)")
        raise dataclasses.FrozenInstanceError(
            f"cfg.{name} cannot be set: a Bridge's architecture config is frozen (TransformerLens's settable "
            f"fields here: {', '.join(TLState.__dataclass_fields__)})"
        )

    def __delattr__(self, name):
        raise dataclasses.FrozenInstanceError(f"cannot delete cfg.{name}")

    # read off the leaves -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        bridge = self._bridge()
        return input_device(bridge.params, bridge._config)  # leaves placed by layer: the embedding's

    @property
    def dtype(self) -> torch.dtype:
        return params_dtype(self._bridge().params)

    # facade state --------------------------------------------------------------------------------

    # default_prepend_bos, tokenizer_prepends_bos, use_attn_result...: properties made below

    @property
    def model_name(self) -> str:
        hf_config = self._bridge().hf_config
        return getattr(hf_config, "_name_or_path", "") or self.original_architecture

    @property
    def tokenizer_name(self) -> str | None:
        tokenizer = self._bridge().tokenizer
        return None if tokenizer is None else tokenizer.name_or_path

    # HookedTransformerConfig's names for what the architecture fields already say ------------------

    @property
    def use_attn_scale(self) -> bool:
        return self.attn_scale != 1.0

    @property
    def use_local_attn(self) -> bool:
        return self.window_size is not None

    @property
    def final_rms(self) -> bool:
        return self.normalization_type == "RMS"

    @property
    def attention_dir(self) -> str:
        """"bidirectional" for an encoder (HookedEncoder's config says so), else "causal"."""
        from ..architectures import family_for
        from ..architectures.family import MASKED_LM

        return "bidirectional" if family_for(self).kind == MASKED_LM else "causal"

    n_devices = 1
    attn_only = False
    use_hook_tokens = False
    ungroup_grouped_query_attention = False
    output_logits_soft_cap = -1.0


def _state_property(name: str) -> property:
    def get(self: TLConfig):
        return getattr(self._bridge()._tl, name)

    get.__doc__ = f"HookedTransformerConfig's {name}, kept on the Bridge (TLState); settable."
    return property(get)


for _name in TLState.__dataclass_fields__:
    setattr(TLConfig, _name, _state_property(_name))
