"""The registry of supported HF families, looked up by HF class name."""

from __future__ import annotations

from ..config import BridgeConfig
from . import bert, bloom, gemma, gpt2, gpt_neo, gptj, llama, neox, olmo, opt, phi, phi3
from .family import CAUSAL_LM, Family

FAMILIES: tuple[Family, ...] = (
    gpt2.FAMILY, llama.LLAMA, llama.MISTRAL, llama.QWEN2, llama.QWEN3, neox.FAMILY, gptj.FAMILY,
    gemma.GEMMA, gemma.GEMMA_2, gemma.GEMMA_3, phi.FAMILY, phi3.FAMILY, olmo.OLMO, olmo.OLMO_2,
    llama.MIXTRAL, gpt_neo.FAMILY, opt.FAMILY, bloom.FAMILY, bert.FOR_MASKED_LM, bert.FOR_PRETRAINING,
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


def require_causal_lm(cfg: BridgeConfig, what: str, why: str = "bidirectional attention, no next token to predict") -> None:
    """Refuse, by name, a causal-LM-only feature for a model of another kind (an encoder)."""
    kind = family_for(cfg).kind
    if kind != CAUSAL_LM:
        raise ValueError(
            f"{what} is for causal LMs; {cfg.original_architecture} is a {kind.replace('_', ' ')} model (an encoder: {why})"
        )


def hf_architecture(hf_config) -> str:
    """The model class an HF config describes. The config's class (its model_type) decides,
    as it does for HF's Auto classes; ``config.architectures`` only chooses among that
    family's classes. A config listing only classes this library does not support is refused
    under the first listed name (a custom class may change the math)."""
    model_type = getattr(hf_config, "model_type", None)
    candidates = [arch for family in FAMILIES if family.name == model_type for arch in family.hf_architectures]
    listed = list(getattr(hf_config, "architectures", None) or [])
    for arch in listed:
        if arch in candidates:
            return arch
    if listed and not any(arch in _BY_ARCHITECTURE for arch in listed):
        return listed[0]
    if candidates:
        return candidates[0]
    return f"{type(hf_config).__name__} (model_type {model_type!r})"


def config_from_hf(hf_config, architecture: str | None = None) -> BridgeConfig:
    """BridgeConfig for an HF config, refusing unsupported architectures and options.
    architecture: the HF class name when a model is at hand (the class decides, not the
    config's ``architectures`` list); by default the one the config describes."""
    family = family_for_architecture(architecture or hf_architecture(hf_config))
    cfg = family.config_from_hf(hf_config)
    if architecture is not None and cfg.original_architecture != architecture:
        cfg = cfg.replace(original_architecture=architecture)
    return cfg
