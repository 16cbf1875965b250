"""GPT-NeoX (GPTNeoXForCausalLM): LayerNorms, partial half-split rotary, fused per-head qkv.

``query_key_value`` is an nn.Linear whose output is interleaved per head, [head, (q, k, v),
d_head] (qkv_layout "head_qkv"); TL's W_Q/W_K/W_V are per-head views of it. The blocks are
parallel (attention and MLP both read resid_pre, each through its own LayerNorm) unless
use_parallel_residual=False. transformers >= 5.14 names the unembedding ``lm_head``, earlier
versions ``embed_out``; the installed version says which.
"""

from __future__ import annotations

import math
import re
from typing import Collection, Mapping

import einops
import torch
import transformers
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import ACTIVATIONS, MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import layer_norm, linear, tied_aliases, tied_unembedding, unembedding
from .rope import rope_fields

ARCHITECTURE = "GPTNeoXForCausalLM"
EMBED, FINAL = "gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm"
# HF renamed GPT-NeoX's unembedding in transformers 5.14. Read off the version: asking the model
# class would import its modeling code (2 s) whenever functional_bridge is imported.
_TRANSFORMERS_VERSION = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
HEAD = "lm_head.weight" if _TRANSFORMERS_VERSION >= (5, 14) else "embed_out.weight"


def config_from_hf(hf) -> BridgeConfig:
    if hf.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{ARCHITECTURE} hidden_act {hf.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if hf.hidden_size % hf.num_attention_heads:
        raise ValueError(f"hidden_size ({hf.hidden_size}) must be divisible by num_attention_heads ({hf.num_attention_heads})")
    d_head = hf.hidden_size // hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", True))
    return BridgeConfig(
        original_architecture=ARCHITECTURE,
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.hidden_act,
        normalization_type="LN",
        eps=hf.layer_norm_eps,
        attn_scale=math.sqrt(d_head),
        parallel_attn_mlp=bool(getattr(hf, "use_parallel_residual", True)),
        qkv_bias=bias,
        attn_out_bias=bias,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        **rope_fields(hf, ARCHITECTURE, d_head, partial_rotary=True),
    )


def _block(layer: int) -> str:
    return f"gpt_neox.layers.{layer}."


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
            p + "post_attention_layernorm.weight": (d,), p + "post_attention_layernorm.bias": (d,),
            p + "attention.query_key_value.weight": (3 * d, d),
        })  # fmt: skip
        if cfg.qkv_bias:
            shapes[p + "attention.query_key_value.bias"] = (3 * d,)
        shapes[p + "attention.dense.weight"] = (d, d)
        if cfg.attn_out_bias:
            shapes[p + "attention.dense.bias"] = (d,)
        shapes.update({
            p + "mlp.dense_h_to_4h.weight": (m, d), p + "mlp.dense_h_to_4h.bias": (m,),
            p + "mlp.dense_4h_to_h.weight": (d, m), p + "mlp.dense_4h_to_h.bias": (d,),
        })  # fmt: skip
    shapes[FINAL + ".weight"] = (d,)
    shapes[FINAL + ".bias"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.d_vocab_out, d)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """Attention biases when attention_bias=False, an unembedding bias, an untied head."""
    d, extra = cfg.d_model, {}
    for layer in range(cfg.n_layers):
        if not cfg.qkv_bias:
            extra[_block(layer) + "attention.query_key_value.bias"] = (3 * d,)
        if not cfg.attn_out_bias:
            extra[_block(layer) + "attention.dense.bias"] = (d,)
    extra["unembed.b_U"] = (cfg.d_vocab_out,)
    if cfg.tie_word_embeddings:
        extra[HEAD] = (cfg.d_vocab_out, d)
    return extra


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], None)


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    attn = AttentionWeights(
        qkv=linear(params, p + "attention.query_key_value"), q=None, k=None, v=None,
        o=linear(params, p + "attention.dense"), qkv_layout="head_qkv",
    )  # fmt: skip
    mlp = MLPWeights(w_in=linear(params, p + "mlp.dense_h_to_4h"), w_gate=None, w_out=linear(params, p + "mlp.dense_4h_to_h"))
    return LayerWeights(layer_norm(params, p + "input_layernorm"), attn, layer_norm(params, p + "post_attention_layernorm"), mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, HEAD, EMBED)  # [d_vocab_out, d_model]
    return UnembedWeights(layer_norm(params, FINAL), Affine(W_U, params.get("unembed.b_U"), in_out=False))


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_neox_weights, as views of the leaves (zeros where HF has no bias)."""
    n, h, d = cfg.n_heads, cfg.d_head, cfg.d_model
    W_E = params[EMBED]
    tl = {"embed.W_E": W_E}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        tl[t + "ln1.w"] = params[p + "input_layernorm.weight"]
        tl[t + "ln1.b"] = params[p + "input_layernorm.bias"]
        W = einops.rearrange(params[p + "attention.query_key_value.weight"], "(i qkv h) m -> qkv i m h", i=n, qkv=3)
        tl[t + "attn.W_Q"], tl[t + "attn.W_K"], tl[t + "attn.W_V"] = W.unbind(0)  # [n, d_model, d_head]
        b = params.get(p + "attention.query_key_value.bias")
        b = W_E.new_zeros(3, n, h) if b is None else einops.rearrange(b, "(i qkv h) -> qkv i h", i=n, qkv=3)
        tl[t + "attn.b_Q"], tl[t + "attn.b_K"], tl[t + "attn.b_V"] = b.unbind(0)
        tl[t + "attn.W_O"] = einops.rearrange(params[p + "attention.dense.weight"], "m (i h) -> i h m", i=n)
        b_O = params.get(p + "attention.dense.bias")
        tl[t + "attn.b_O"] = W_E.new_zeros(d) if b_O is None else b_O
        tl[t + "ln2.w"] = params[p + "post_attention_layernorm.weight"]
        tl[t + "ln2.b"] = params[p + "post_attention_layernorm.bias"]
        tl[t + "mlp.W_in"] = params[p + "mlp.dense_h_to_4h.weight"].T
        tl[t + "mlp.b_in"] = params[p + "mlp.dense_h_to_4h.bias"]
        tl[t + "mlp.W_out"] = params[p + "mlp.dense_4h_to_h.weight"].T
        tl[t + "mlp.b_out"] = params[p + "mlp.dense_4h_to_h.bias"]
    tl["ln_final.w"] = params[FINAL + ".weight"]
    tl["ln_final.b"] = params[FINAL + ".bias"]
    tl["unembed.W_U"] = unembedding(params, HEAD, EMBED).T
    b_U = params.get("unembed.b_U")
    tl["unembed.b_U"] = W_E.new_zeros(cfg.d_vocab_out) if b_U is None else b_U
    return tl


def _fused_bias(tl: Mapping[str, Tensor], t: str) -> Tensor:
    return einops.rearrange(torch.stack([tl[t + "attn.b_" + x] for x in "QKV"]), "qkv i h -> (i qkv h)")


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras)."""
    from_tl = {EMBED: tl["embed.W_E"]}  # HF name -> TL tensor in HF layout, every leaf that can exist
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        W = torch.stack([tl[t + "attn.W_" + x] for x in "QKV"])  # [3, n, d_model, d_head]
        from_tl.update({
            p + "input_layernorm.weight": tl[t + "ln1.w"], p + "input_layernorm.bias": tl[t + "ln1.b"],
            p + "post_attention_layernorm.weight": tl[t + "ln2.w"], p + "post_attention_layernorm.bias": tl[t + "ln2.b"],
            p + "attention.query_key_value.weight": einops.rearrange(W, "qkv i m h -> (i qkv h) m"),
            p + "attention.query_key_value.bias": _fused_bias(tl, t),
            p + "attention.dense.weight": einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)"),
            p + "attention.dense.bias": tl[t + "attn.b_O"],
            p + "mlp.dense_h_to_4h.weight": tl[t + "mlp.W_in"].T, p + "mlp.dense_h_to_4h.bias": tl[t + "mlp.b_in"],
            p + "mlp.dense_4h_to_h.weight": tl[t + "mlp.W_out"].T, p + "mlp.dense_4h_to_h.bias": tl[t + "mlp.b_out"],
        })  # fmt: skip
    from_tl.update({
        FINAL + ".weight": tl["ln_final.w"], FINAL + ".bias": tl["ln_final.b"],
        HEAD: tl["unembed.W_U"].T, "unembed.b_U": tl["unembed.b_U"],
    })  # fmt: skip
    return new_leaves(from_tl, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="gpt_neox",
    hf_architectures=(ARCHITECTURE,),
    config_from_hf=config_from_hf,
    param_shapes=param_shapes,
    extra_param_shapes=extra_param_shapes,
    tied_aliases=tied_aliases(HEAD, EMBED),
    embed_weights=embed_weights,
    layer_weights=layer_weights,
    unembed_weights=unembed_weights,
    tl_weights=tl_weights,
    hf_from_tl=hf_from_tl,
    tl_derived_keys=tied_unembedding,
)
