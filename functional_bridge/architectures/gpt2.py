"""GPT-2 (GPT2LMHeadModel): LayerNorm, learned positions, fused Conv1D q/k/v, GELU MLP.

HF stores every projection as Conv1D, W: [d_in, d_out]; the fused c_attn output is
[q heads | k heads | v heads]. TransformerLens's views are those of TL 3.9's
``convert_gpt2_weights``; the unembedding is the tied token embedding unless processing added
an untied ``lm_head.weight`` (and an ``unembed.b_U``).
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import einops
import torch
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import ACTIVATIONS, MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import conv1d, layer_norm, tied_aliases, tied_unembedding, unembedding

ARCHITECTURE = "GPT2LMHeadModel"


def config_from_hf(hf) -> BridgeConfig:
    if getattr(hf, "add_cross_attention", False):
        raise ValueError("GPT-2 with add_cross_attention=True (an encoder-decoder) is not supported")
    if hf.activation_function not in ACTIVATIONS:
        raise ValueError(
            f"GPT-2 activation_function {hf.activation_function!r} is not supported; "
            f"supported: {sorted(ACTIVATIONS)}"
        )
    if hf.n_embd % hf.n_head:
        raise ValueError(f"n_embd ({hf.n_embd}) must be divisible by n_head ({hf.n_head})")
    d_head = hf.n_embd // hf.n_head
    # reorder_and_upcast_attn only changes numerics (scores in float32), which this bridge
    # always does, so it needs nothing here.
    return BridgeConfig(
        original_architecture=ARCHITECTURE,
        n_layers=hf.n_layer,
        d_model=hf.n_embd,
        n_heads=hf.n_head,
        d_head=d_head,
        d_mlp=hf.n_inner if hf.n_inner is not None else 4 * hf.n_embd,
        d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions,
        act_fn=hf.activation_function,
        normalization_type="LN",
        eps=hf.layer_norm_epsilon,
        positional_embedding_type="standard",
        attn_scale=math.sqrt(d_head) if hf.scale_attn_weights else 1.0,
        scale_attn_by_inverse_layer_idx=bool(hf.scale_attn_by_inverse_layer_idx),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def _block(layer: int) -> str:
    return f"transformer.h.{layer}."


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {
        "transformer.wte.weight": (cfg.d_vocab, d),
        "transformer.wpe.weight": (cfg.n_ctx, d),
    }
    for layer in range(cfg.n_layers):
        p = _block(layer)
        shapes.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (d, 3 * d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, m), p + "mlp.c_fc.bias": (m,),
            p + "mlp.c_proj.weight": (m, d), p + "mlp.c_proj.bias": (d,),
        })  # fmt: skip
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["transformer.ln_f.bias"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.d_vocab_out, d)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    extra: Shapes = {"unembed.b_U": (cfg.d_vocab_out,)}
    if cfg.tie_word_embeddings:
        extra["lm_head.weight"] = (cfg.d_vocab_out, cfg.d_model)
    return extra


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params["transformer.wte.weight"], params["transformer.wpe.weight"])


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    attn = AttentionWeights(
        qkv=conv1d(params, p + "attn.c_attn"), q=None, k=None, v=None, o=conv1d(params, p + "attn.c_proj")
    )
    mlp = MLPWeights(w_in=conv1d(params, p + "mlp.c_fc"), w_gate=None, w_out=conv1d(params, p + "mlp.c_proj"))
    return LayerWeights(layer_norm(params, p + "ln_1"), attn, layer_norm(params, p + "ln_2"), mlp)


def _unembedding(params: Params) -> tuple[Tensor, Tensor | None]:
    W_U = unembedding(params, "lm_head.weight", "transformer.wte.weight")  # [d_vocab_out, d_model]
    return W_U, params.get("unembed.b_U")


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U, b_U = _unembedding(params)
    return UnembedWeights(layer_norm(params, "transformer.ln_f"), Affine(W_U, b_U, in_out=False))


def tl_weights(params: Params, cfg: BridgeConfig) -> dict:
    """TransformerLens 3.9's convert_gpt2_weights, as views of the leaves."""
    d, n = cfg.d_model, cfg.n_heads
    W_pos = params["transformer.wpe.weight"]
    tl = {"embed.W_E": params["transformer.wte.weight"], "pos_embed.W_pos": W_pos[: cfg.n_ctx]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        tl[t + "ln1.w"] = params[p + "ln_1.weight"]
        tl[t + "ln1.b"] = params[p + "ln_1.bias"]
        W_Q, W_K, W_V = params[p + "attn.c_attn.weight"].split(d, dim=1)  # [d_model, n * d_head]
        for key, W in (("W_Q", W_Q), ("W_K", W_K), ("W_V", W_V)):
            tl[t + "attn." + key] = einops.rearrange(W, "m (i h) -> i m h", i=n)
        b_Q, b_K, b_V = params[p + "attn.c_attn.bias"].view(3, n, cfg.d_head).unbind(0)
        tl[t + "attn.b_Q"], tl[t + "attn.b_K"], tl[t + "attn.b_V"] = b_Q, b_K, b_V
        tl[t + "attn.W_O"] = einops.rearrange(params[p + "attn.c_proj.weight"], "(i h) m -> i h m", i=n)
        tl[t + "attn.b_O"] = params[p + "attn.c_proj.bias"]
        tl[t + "ln2.w"] = params[p + "ln_2.weight"]
        tl[t + "ln2.b"] = params[p + "ln_2.bias"]
        tl[t + "mlp.W_in"] = params[p + "mlp.c_fc.weight"]
        tl[t + "mlp.b_in"] = params[p + "mlp.c_fc.bias"]
        tl[t + "mlp.W_out"] = params[p + "mlp.c_proj.weight"]
        tl[t + "mlp.b_out"] = params[p + "mlp.c_proj.bias"]
    W_U, b_U = _unembedding(params)
    tl["unembed.W_U"] = W_U.T
    if b_U is not None:
        tl["unembed.b_U"] = b_U
    tl["ln_final.w"] = params["transformer.ln_f.weight"]
    tl["ln_final.b"] = params["transformer.ln_f.bias"]
    return tl


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras) from
    a complete TL dict; hf_from_tl(tl_weights(p), cfg, ()) == p bitwise."""
    hf = {"transformer.wte.weight": tl["embed.W_E"], "transformer.wpe.weight": tl["pos_embed.W_pos"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        hf[p + "ln_1.weight"] = tl[t + "ln1.w"]
        hf[p + "ln_1.bias"] = tl[t + "ln1.b"]
        qkv = [einops.rearrange(tl[t + "attn." + key], "i m h -> m (i h)") for key in ("W_Q", "W_K", "W_V")]
        hf[p + "attn.c_attn.weight"] = torch.cat(qkv, dim=1)  # [d_model, 3 * n * d_head]
        hf[p + "attn.c_attn.bias"] = torch.cat([tl[t + "attn." + key].reshape(-1) for key in ("b_Q", "b_K", "b_V")])
        hf[p + "attn.c_proj.weight"] = einops.rearrange(tl[t + "attn.W_O"], "i h m -> (i h) m")
        hf[p + "attn.c_proj.bias"] = tl[t + "attn.b_O"]
        hf[p + "ln_2.weight"] = tl[t + "ln2.w"]
        hf[p + "ln_2.bias"] = tl[t + "ln2.b"]
        hf[p + "mlp.c_fc.weight"] = tl[t + "mlp.W_in"]
        hf[p + "mlp.c_fc.bias"] = tl[t + "mlp.b_in"]
        hf[p + "mlp.c_proj.weight"] = tl[t + "mlp.W_out"]
        hf[p + "mlp.c_proj.bias"] = tl[t + "mlp.b_out"]
    hf["transformer.ln_f.weight"] = tl["ln_final.w"]
    hf["transformer.ln_f.bias"] = tl["ln_final.b"]
    hf["lm_head.weight"] = tl["unembed.W_U"].T  # [d_vocab_out, d_model]: a leaf when untied, else an extra
    if "unembed.b_U" in tl:  # present when the extra leaf is
        hf["unembed.b_U"] = tl["unembed.b_U"]
    return new_leaves(hf, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="gpt2",
    hf_architectures=(ARCHITECTURE,),
    config_from_hf=config_from_hf,
    param_shapes=param_shapes,
    extra_param_shapes=extra_param_shapes,
    tied_aliases=tied_aliases("lm_head.weight", "transformer.wte.weight"),
    embed_weights=embed_weights,
    layer_weights=layer_weights,
    unembed_weights=unembed_weights,
    tl_weights=tl_weights,
    hf_from_tl=hf_from_tl,
    tl_derived_keys=tied_unembedding,  # writing W_U unties it: see editing.py
)
