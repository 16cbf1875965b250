"""Moving between HF models and params without copying tensors.

``hf_params`` adopts an HF model's own Parameter objects; ``build_hf_model`` builds an HF model
whose parameters are given tensors (built with its parameters on the meta device, so nothing
is allocated or initialised twice); ``load_hf_model`` is from_pretrained after the architecture
is checked.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Mapping

import torch
import transformers
from torch import Tensor, nn

from .architectures import family_for, family_for_architecture, hf_architecture
from .config import BridgeConfig


def hf_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The HF model's parameters, names and order as ``named_parameters()`` (tied ones once)."""
    return dict(model.named_parameters())


def hf_class(architecture: str) -> type:
    family_for_architecture(architecture)  # raises for unsupported architectures
    return getattr(transformers, architecture)


_meta_parameters = threading.local()  # .depth > 0: this thread registers parameters on meta
_patch_lock = threading.Lock()
_patch_users = 0  # threads inside parameters_on_meta; the patch is installed while any is
_unpatched = [nn.Module.register_parameter]  # what the patch wraps, captured at install


def _register_parameter(module: nn.Module, name: str, param) -> None:
    """nn.Module.register_parameter, registering on the meta device in threads that asked."""
    _unpatched[0](module, name, param)
    if param is not None and getattr(_meta_parameters, "depth", 0):
        param = module._parameters[name]
        module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta():
    """In this thread only, register every new module parameter on the meta device:
    construction allocates nothing and weight initialisation is free. Buffers are created as
    usual. Other threads building modules meanwhile are unaffected (the flag is thread-local;
    the class attribute is patched only while some thread is inside, and passes through)."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            _unpatched[0] = nn.Module.register_parameter
            nn.Module.register_parameter = _register_parameter
        _patch_users += 1
    _meta_parameters.depth = getattr(_meta_parameters, "depth", 0) + 1
    try:
        yield
    finally:
        _meta_parameters.depth -= 1
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                nn.Module.register_parameter = _unpatched[0]


def _set_parameter(model: nn.Module, name: str, tensor: Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if not isinstance(tensor, nn.Parameter):
        tensor = nn.Parameter(tensor, requires_grad=tensor.requires_grad)
    module._parameters[leaf] = tensor


def build_hf_model(params: Mapping[str, Tensor], cfg: BridgeConfig, hf_config) -> nn.Module:
    """An HF model (eval mode) whose parameters are exactly the given tensors, not copies."""
    family = family_for(cfg)
    extra = [name for name in params if name in family.extra_param_shapes(cfg)]
    untied_head = "lm_head.weight" in params and cfg.tie_word_embeddings
    unholdable = [name for name in extra if not (name == "lm_head.weight" and untied_head)]
    if unholdable:
        listed = ", ".join(unholdable[:6]) + (f" ... ({len(unholdable)} in all)" if len(unholdable) > 6 else "")
        raise ValueError(
            f"{hf_architecture(hf_config)} has no slot for {listed}, so this model cannot be exported "
            "to HF: these extra leaves hold TransformerLens weights the HF class lacks, added by "
            "processing or a TL edit (fold_ln folds the final LayerNorm's bias into unembed.b_U; "
            "folding into a bias HF does not have adds it)"
        )
    hf_config = describe_leaves(hf_config, params, cfg)
    with parameters_on_meta():
        model = hf_class(cfg.original_architecture)(hf_config)
    for name, tensor in params.items():
        _set_parameter(model, name, tensor)
    for alias, target in family.tied_aliases(cfg).items():
        if alias not in params:
            _set_parameter(model, alias, params[target])
    left_on_meta = [name for name, p in model.named_parameters(remove_duplicate=False) if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"params did not supply these HF parameters: {left_on_meta}")
    device = next(iter(params.values())).device
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)
    return model.eval()


def describe_leaves(hf_config, params: Mapping[str, Tensor], cfg: BridgeConfig):
    """A copy of hf_config that describes these leaves: the class they are for
    (``architectures``), and an untied head once ``lm_head.weight`` is a leaf of its own (a TL
    edit of W_U or processing unties it)."""
    hf_config = copy.deepcopy(hf_config)
    hf_config.architectures = [cfg.original_architecture]
    if any(alias in params for alias in family_for(cfg).tied_aliases(cfg)):
        hf_config.tie_word_embeddings = False
    return hf_config


def load_hf_model(name_or_path: str, dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """HF from_pretrained for a supported causal LM, refused before loading if unsupported."""
    hf_config = transformers.AutoConfig.from_pretrained(name_or_path)
    cls = hf_class(hf_architecture(hf_config))
    model = cls.from_pretrained(name_or_path, dtype=dtype) if dtype is not None else cls.from_pretrained(name_or_path)
    return model.to(device) if device is not None else model
