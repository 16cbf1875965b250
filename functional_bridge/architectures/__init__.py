"""The registry of supported HF families, looked up by HF class name."""

from __future__ import annotations

from ..config import BridgeConfig
from . import gemma, gpt2, gptj, llama, neox, olmo, phi, phi3
from .family import Family

FAMILIES: tuple[Family, ...] = (
    gpt2.FAMILY, llama.LLAMA, llama.MISTRAL, llama.QWEN2, llama.QWEN3, neox.FAMILY, gptj.FAMILY,
    gemma.GEMMA, gemma.GEMMA_2, gemma.GEMMA_3, phi.FAMILY, phi3.FAMILY, olmo.OLMO, olmo.OLMO_2,
)  # fmt: skip

_BY_ARCHITECTURE = {arch: family for family in FAMILIES for arch in family.hf_architectures}


def supported_architectures() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


class UnsupportedArchitectureError(ValueError):
    pass


def family_for_architecture(architecture: str) -> Family:
    try:
        return _BY_ARCHITECTURE[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None


def family_for(cfg: BridgeConfig) -> Family:
    return family_for_architecture(cfg.original_architecture)


def hf_architecture(hf_config) -> str:
    """The causal-LM class name an HF config describes (its first listed architecture, else the
    one registered for its model_type)."""
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return arch
    if architectures:
        return architectures[0]
    for family in FAMILIES:
        if family.name == getattr(hf_config, "model_type", None):
            return family.hf_architectures[0]
    return f"{type(hf_config).__name__} (model_type {getattr(hf_config, 'model_type', None)!r})"


def config_from_hf(hf_config) -> BridgeConfig:
    """BridgeConfig for an HF config, refusing unsupported architectures and options."""
    return family_for_architecture(hf_architecture(hf_config)).config_from_hf(hf_config)
