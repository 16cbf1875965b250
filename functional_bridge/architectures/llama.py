"""Llama-style decoders: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

One layout (``model.layers.{i}.self_attn.{q,k,v,o}_proj``, gated ``mlp.{gate,up,down}_proj``,
RMSNorms, half-split rotary, grouped-query attention); the four differ only by data (_Spec):
which projection biases exist, Qwen3's per-head q/k RMSNorm, sliding windows, and how TL 3.9
maps n_key_value_heads (Llama, Qwen3: None when it equals n_heads; Mistral, Qwen2: always set).
With grouped-query attention TL's keys are ``_W_K``/``_W_V``/``_b_K``/``_b_V`` (views of the
leaves) and ``W_K``... are HookedTransformer's repeat_interleave expansions of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Collection, Mapping

import einops
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import ACTIVATIONS, MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import linear, rms_norm, tied_aliases, tied_unembedding, unembedding
from .rope import rope_fields

EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@dataclass(frozen=True)
class _Spec:
    name: str  # HF model_type
    architecture: str
    qkv_bias: Callable[[object], bool]
    out_bias: Callable[[object], bool]
    qk_norm: bool
    tl_always_kv_heads: bool  # TL sets n_key_value_heads even when it equals n_heads
    windows: Callable[[object], tuple]  # hf -> (window_size, attn_types)


def _no_window(hf) -> tuple:
    return None, None


def _mistral_window(hf) -> tuple:
    return getattr(hf, "sliding_window", None), None  # every layer, when set


def _qwen_windows(hf) -> tuple:
    window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", False) else None
    if window is None:
        return None, None
    layer_types = getattr(hf, "layer_types", None) or [
        "sliding_attention" if i >= hf.max_window_layers else "full_attention" for i in range(hf.num_hidden_layers)
    ]
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
}


def _config_from_hf(spec: _Spec, hf) -> BridgeConfig:
    arch = spec.architecture
    if getattr(hf, "mlp_bias", False):
        raise ValueError(
            f"{arch} with mlp_bias=True is not supported: TransformerLens's gated MLP has no gate or "
            "up-projection bias (its b_in is added after the product)"
        )
    if hf.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{arch} hidden_act {hf.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    n_heads = hf.num_attention_heads
    d_head = getattr(hf, "head_dim", None) or hf.hidden_size // n_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or n_heads
    window, attn_types = spec.windows(hf)
    return BridgeConfig(
        original_architecture=arch,
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=n_heads,
        d_head=d_head,
        n_key_value_heads=n_kv if spec.tl_always_kv_heads or n_kv != n_heads else None,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.hidden_act,
        normalization_type="RMS",
        eps=hf.rms_norm_eps,
        attn_scale=math.sqrt(d_head),
        gated_mlp=True,
        use_qk_norm=spec.qk_norm,
        qkv_bias=spec.qkv_bias(hf),
        attn_out_bias=spec.out_bias(hf),
        window_size=window,
        attn_types=attn_types,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **rope_fields(hf, arch, d_head, partial_rotary=False),
    )


def _block(layer: int) -> str:
    return f"model.layers.{layer}."


def _projection_shapes(cfg: BridgeConfig) -> dict[str, tuple[int, int]]:
    """self_attn projection -> (d_out, d_in)."""
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    d = cfg.d_model
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q)}


def _has_bias(cfg: BridgeConfig, proj: str) -> bool:
    return cfg.attn_out_bias if proj == "o_proj" else cfg.qkv_bias


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        for proj, shape in _projection_shapes(cfg).items():
            shapes[f"{p}self_attn.{proj}.weight"] = shape
            if _has_bias(cfg, proj):
                shapes[f"{p}self_attn.{proj}.bias"] = shape[:1]
        if cfg.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (cfg.d_head,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.d_head,)
        shapes.update({
            p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d), p + "mlp.down_proj.weight": (d, m),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })  # fmt: skip
    shapes[FINAL_NORM] = (d,)
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.d_vocab_out, d)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """Projection biases this config's HF layout lacks, an unembedding bias, an untied head."""
    extra: Shapes = {}
    for layer in range(cfg.n_layers):
        for proj, shape in _projection_shapes(cfg).items():
            if not _has_bias(cfg, proj):
                extra[f"{_block(layer)}self_attn.{proj}.bias"] = shape[:1]
    extra["unembed.b_U"] = (cfg.d_vocab_out,)
    if cfg.tie_word_embeddings:
        extra[LM_HEAD] = (cfg.d_vocab_out, cfg.d_model)
    return extra


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], None)


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer) + "self_attn."
    q_norm = rms_norm(params, p + "q_norm.weight") if cfg.use_qk_norm else None
    k_norm = rms_norm(params, p + "k_norm.weight") if cfg.use_qk_norm else None
    attn = AttentionWeights(
        qkv=None, q=linear(params, p + "q_proj"), k=linear(params, p + "k_proj"), v=linear(params, p + "v_proj"),
        o=linear(params, p + "o_proj"), q_norm=q_norm, k_norm=k_norm,
    )  # fmt: skip
    m = _block(layer) + "mlp."
    mlp = MLPWeights(w_in=linear(params, m + "up_proj"), w_gate=linear(params, m + "gate_proj"), w_out=linear(params, m + "down_proj"))
    ln1 = rms_norm(params, _block(layer) + "input_layernorm.weight")
    return LayerWeights(ln1, attn, rms_norm(params, _block(layer) + "post_attention_layernorm.weight"), mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, LM_HEAD, EMBED)  # [d_vocab_out, d_model]
    return UnembedWeights(rms_norm(params, FINAL_NORM), Affine(W_U, params.get("unembed.b_U"), in_out=False))


def _gqa_prefix(cfg: BridgeConfig) -> str:
    return "_" if cfg.n_key_value_heads is not None else ""


def _heads_in(W: Tensor, n: int) -> Tensor:
    """nn.Linear weight [n * d_head, d_model] -> [n, d_model, d_head] (a view)."""
    return einops.rearrange(W, "(n h) m -> n m h", n=n)


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_{llama,mistral,qwen2,qwen3}_weights as views of the leaves (zeros where
    HF has no bias), plus HookedTransformer's expanded W_K/W_V/b_K/b_V under grouped-query
    attention. Unlike TL's converters, biases HF does have (attention_bias=True) are read."""
    W_E = params[EMBED]
    zeros = W_E.new_zeros
    n, n_kv, h, g = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, _gqa_prefix(cfg)
    tl = {"embed.W_E": W_E}
    for layer in range(cfg.n_layers):
        p, t = _block(layer) + "self_attn.", f"blocks.{layer}."
        tl[t + "ln1.w"] = params[_block(layer) + "input_layernorm.weight"]
        tl[t + "attn.W_Q"] = _heads_in(params[p + "q_proj.weight"], n)
        tl[t + f"attn.{g}W_K"] = _heads_in(params[p + "k_proj.weight"], n_kv)
        tl[t + f"attn.{g}W_V"] = _heads_in(params[p + "v_proj.weight"], n_kv)
        if cfg.use_qk_norm:
            tl[t + "attn.q_norm.w"] = params[p + "q_norm.weight"]
            tl[t + "attn.k_norm.w"] = params[p + "k_norm.weight"]
        for key, proj, heads in (("b_Q", "q_proj", n), (f"{g}b_K", "k_proj", n_kv), (f"{g}b_V", "v_proj", n_kv)):
            bias = params.get(p + proj + ".bias")
            tl[t + "attn." + key] = zeros(heads, h) if bias is None else bias.view(heads, h)
        tl[t + "attn.W_O"] = einops.rearrange(params[p + "o_proj.weight"], "m (n h) -> n h m", n=n)
        b_O = params.get(p + "o_proj.bias")
        tl[t + "attn.b_O"] = zeros(cfg.d_model) if b_O is None else b_O
        tl[t + "ln2.w"] = params[_block(layer) + "post_attention_layernorm.weight"]
        m = _block(layer) + "mlp."
        tl[t + "mlp.W_in"] = params[m + "up_proj.weight"].T
        tl[t + "mlp.W_gate"] = params[m + "gate_proj.weight"].T
        tl[t + "mlp.b_in"] = zeros(cfg.d_mlp)
        tl[t + "mlp.W_out"] = params[m + "down_proj.weight"].T
        tl[t + "mlp.b_out"] = zeros(cfg.d_model)
    tl["ln_final.w"] = params[FINAL_NORM]
    tl["unembed.W_U"] = unembedding(params, LM_HEAD, EMBED).T
    b_U = params.get("unembed.b_U")
    tl["unembed.b_U"] = zeros(cfg.d_vocab_out) if b_U is None else b_U
    if g:
        group = n // n_kv
        for derived, source in tl_derived_keys(cfg).items():
            if source != "embed.W_E":
                tl[derived] = tl[source] if group == 1 else tl[source].repeat_interleave(group, dim=0)
    return tl


def tl_derived_keys(cfg: BridgeConfig) -> dict[str, str]:
    """Expanded grouped-query keys -> their _-prefixed sources; a tied W_U -> embed.W_E."""
    derived = {}
    if cfg.n_key_value_heads is not None:
        for layer in range(cfg.n_layers):
            t = f"blocks.{layer}.attn."
            derived.update({t + key: t + "_" + key for key in ("W_K", "W_V", "b_K", "b_V")})
    return derived | tied_unembedding(cfg)


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras).
    TL tensors with no HF slot (zero biases not requested as extras, the gated MLP's b_in and
    b_out) are not read; derived keys (expanded W_K, a tied W_U) are read from their sources."""
    g = _gqa_prefix(cfg)
    hf = {EMBED: tl["embed.W_E"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        sources = {"q_proj": ("W_Q", "b_Q"), "k_proj": (g + "W_K", g + "b_K"), "v_proj": (g + "W_V", g + "b_V")}
        for proj, (W, b) in sources.items():
            hf[f"{p}self_attn.{proj}.weight"] = einops.rearrange(tl[t + "attn." + W], "n m h -> (n h) m")
            hf[f"{p}self_attn.{proj}.bias"] = tl[t + "attn." + b].reshape(-1)  # a leaf or an extra
        hf[p + "self_attn.o_proj.weight"] = einops.rearrange(tl[t + "attn.W_O"], "n h m -> m (n h)")
        hf[p + "self_attn.o_proj.bias"] = tl[t + "attn.b_O"]
        if cfg.use_qk_norm:
            hf[p + "self_attn.q_norm.weight"] = tl[t + "attn.q_norm.w"]
            hf[p + "self_attn.k_norm.weight"] = tl[t + "attn.k_norm.w"]
        hf[p + "mlp.gate_proj.weight"] = tl[t + "mlp.W_gate"].T
        hf[p + "mlp.up_proj.weight"] = tl[t + "mlp.W_in"].T
        hf[p + "mlp.down_proj.weight"] = tl[t + "mlp.W_out"].T
        hf[p + "input_layernorm.weight"] = tl[t + "ln1.w"]
        hf[p + "post_attention_layernorm.weight"] = tl[t + "ln2.w"]
    hf[FINAL_NORM] = tl["ln_final.w"]
    hf[LM_HEAD] = tl["unembed.W_U"].T  # a leaf when untied, else an extra
    hf["unembed.b_U"] = tl["unembed.b_U"]
    return new_leaves(hf, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


def _family(spec: _Spec) -> Family:
    return Family(
        name=spec.name,
        hf_architectures=(spec.architecture,),
        config_from_hf=lambda hf: _config_from_hf(spec, hf),
        param_shapes=param_shapes,
        extra_param_shapes=extra_param_shapes,
        tied_aliases=tied_aliases(LM_HEAD, EMBED),
        embed_weights=embed_weights,
        layer_weights=layer_weights,
        unembed_weights=unembed_weights,
        tl_weights=tl_weights,
        hf_from_tl=hf_from_tl,
        tl_derived_keys=tl_derived_keys,
    )


LLAMA, MISTRAL, QWEN2, QWEN3 = (_family(SPECS[name]) for name in ("llama", "mistral", "qwen2", "qwen3"))
