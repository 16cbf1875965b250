"""Llama-style decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM,
MixtralForCausalLM.

Their HF configs -> BridgeConfig; the layout (and TL's views of it) is decoder.py's. The four
differ only by data (_Spec): which projection biases exist, Qwen3's per-head q/k RMSNorm, sliding
windows, and how TL 3.9 maps n_key_value_heads (Llama, Qwen3: None when it equals n_heads;
Mistral, Qwen2, Mixtral: always set). Mixtral is Mistral with a top-k routed mixture of experts
for the MLP (components/moe.py); its router's training-only jitter noise does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..config import BridgeConfig
from .decoder import Layout, decoder_family
from .family import Family
from .hf_fields import dimension_fields
from .rope import rope_fields


@dataclass(frozen=True)
class _Spec:
    name: str  # HF model_type
    architecture: str
    qkv_bias: Callable[[object], bool]
    out_bias: Callable[[object], bool]
    qk_norm: bool
    tl_always_kv_heads: bool  # TL sets n_key_value_heads even when it equals n_heads
    windows: Callable[[object], tuple]  # hf -> (window_size, attn_types)
    moe: bool = False  # a top-k routed mixture of experts (Mixtral)


def _no_window(hf) -> tuple:
    return None, None


def _mistral_window(hf) -> tuple:
    return getattr(hf, "sliding_window", None), None  # every layer, when set


def _qwen_windows(hf) -> tuple:
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", False) else None
    layer_types = getattr(hf, "layer_types", None) or [
        "sliding_attention" if i >= hf.max_window_layers else "full_attention" for i in range(hf.num_hidden_layers)
    ]
    return layer_type_windows(window, layer_types)


def layer_type_windows(window: int | None, layer_types) -> tuple:
    """HF's layer_types ("sliding_attention"/"full_attention" per layer) -> (window_size,
    attn_types): attn_types None when every layer is alike."""
    if window is None:
        return None, None
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"layer_types {sorted(unknown)} are not supported")
    attn_types = tuple("local" if t == "sliding_attention" else "global" for t in layer_types)
    if "local" not in attn_types:
        return None, None
    return window, None if "global" not in attn_types else attn_types


def _attention_bias(hf) -> bool:
    return bool(getattr(hf, "attention_bias", False))


SPECS = {
    "llama": _Spec("llama", "LlamaForCausalLM", _attention_bias, _attention_bias, False, False, _no_window),
    "mistral": _Spec("mistral", "MistralForCausalLM", lambda hf: False, lambda hf: False, False, True, _mistral_window),
    "qwen2": _Spec("qwen2", "Qwen2ForCausalLM", lambda hf: True, lambda hf: False, False, True, _qwen_windows),
    "qwen3": _Spec("qwen3", "Qwen3ForCausalLM", _attention_bias, _attention_bias, True, False, _qwen_windows),
    "mixtral": _Spec("mixtral", "MixtralForCausalLM", lambda hf: False, lambda hf: False, False, True, _mistral_window, moe=True),
}


def _config_from_hf(spec: _Spec, hf) -> BridgeConfig:
    arch = spec.architecture
    if getattr(hf, "mlp_bias", False):
        raise ValueError(
            f"{arch} with mlp_bias=True is not supported: TransformerLens's gated MLP has no gate or "
            "up-projection bias (its b_in is added after the product)"
        )
    dims = dimension_fields(hf, arch, keep_kv_heads=spec.tl_always_kv_heads)
    window, attn_types = spec.windows(hf)
    experts = dict(num_experts=hf.num_local_experts, experts_per_token=hf.num_experts_per_tok) if spec.moe else {}
    return BridgeConfig(
        **dims,
        normalization_type="RMS",
        eps=hf.rms_norm_eps,
        gated_mlp=True,
        use_qk_norm=spec.qk_norm,
        qkv_bias=spec.qkv_bias(hf),
        attn_out_bias=spec.out_bias(hf),
        window_size=window,
        attn_types=attn_types,
        **rope_fields(hf, arch, dims["d_head"], partial_rotary=False),
        **experts,
    )


def _family(spec: _Spec) -> Family:
    layout = Layout(moe=spec.moe)
    return decoder_family(spec.name, spec.architecture, lambda hf: _config_from_hf(spec, hf), layout)


LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL = (_family(SPECS[name]) for name in ("llama", "mistral", "qwen2", "qwen3", "mixtral"))
