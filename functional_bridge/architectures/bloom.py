"""BLOOM (BloomForCausalLM): ALiBi instead of positions, a LayerNorm on the token embedding,
fused per-head qkv, tanh-GELU MLPs of width 4 * d_model.

``word_embeddings_layernorm`` is TL's ``embed.ln`` (hooks ``embed.ln.hook_scale``/
``hook_normalized`` before ``hook_embed``). ``query_key_value`` is interleaved per head,
[head, (q, k, v), d_head], as GPT-NeoX's (qkv_layout "head_qkv"); TL's W_Q/W_K/W_V are views of
it. ALiBi: components/alibi.py (HF's slopes, positions counted over real tokens as HF's BLOOM
counts them; ``hook_attn_scores`` holds TL's relative bias, HF's absolute one differs by a
constant per query row). ``apply_residual_connection_post_layernorm`` (the residual branch starts
at the norm's output) is cfg.residual_from_norm; HookedTransformer has no such option.
``pretraining_tp`` alone changes nothing; with ``slow_but_exact`` HF's attention output and MLP
output projections sum tensor-parallel slices and drop their biases, a different function: refused.
BLOOM has no context length; n_ctx is 2048 (its training length, as TL 3.9's mapping).
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import einops
import torch
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import layer_norm, linear, tied_aliases, tied_unembedding, unembedding

ARCHITECTURE = "BloomForCausalLM"
EMBED, EMBED_LN, FINAL, HEAD = "transformer.word_embeddings.weight", "transformer.word_embeddings_layernorm", "transformer.ln_f", "lm_head.weight"
N_CTX = 2048


def config_from_hf(hf) -> BridgeConfig:
    if hf.hidden_size % hf.n_head:
        raise ValueError(f"hidden_size ({hf.hidden_size}) must be divisible by n_head ({hf.n_head})")
    if hf.pretraining_tp > 1 and hf.slow_but_exact:
        raise ValueError(
            f"{ARCHITECTURE} slow_but_exact with pretraining_tp={hf.pretraining_tp} is not supported: HF's sliced "
            "output projections then leave out the dense biases"
        )
    d_head = hf.hidden_size // hf.n_head
    return BridgeConfig(
        original_architecture=ARCHITECTURE,
        n_layers=hf.n_layer,
        d_model=hf.hidden_size,
        n_heads=hf.n_head,
        d_head=d_head,
        d_mlp=4 * hf.hidden_size,
        d_vocab=hf.vocab_size,
        n_ctx=N_CTX,
        act_fn="gelu_fast",  # HF's BloomGelu: the tanh approximation
        normalization_type="LN",
        eps=hf.layer_norm_epsilon,
        positional_embedding_type="alibi",
        attn_scale=math.sqrt(d_head),
        post_embedding_ln=True,
        residual_from_norm=bool(hf.apply_residual_connection_post_layernorm),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def _block(layer: int) -> str:
    return f"transformer.h.{layer}."


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d), EMBED_LN + ".weight": (d,), EMBED_LN + ".bias": (d,)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        a = p + "self_attention."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
            a + "query_key_value.weight": (3 * d, d), a + "query_key_value.bias": (3 * d,),
            a + "dense.weight": (d, d), a + "dense.bias": (d,),
            p + "post_attention_layernorm.weight": (d,), p + "post_attention_layernorm.bias": (d,),
            p + "mlp.dense_h_to_4h.weight": (m, d), p + "mlp.dense_h_to_4h.bias": (m,),
            p + "mlp.dense_4h_to_h.weight": (d, m), p + "mlp.dense_4h_to_h.bias": (d,),
        })  # fmt: skip
    shapes.update({FINAL + ".weight": (d,), FINAL + ".bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.d_vocab_out, d)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """An unembedding bias (HF's BLOOM has none), an untied head."""
    extra: Shapes = {"unembed.b_U": (cfg.d_vocab_out,)}
    if cfg.tie_word_embeddings:
        extra[HEAD] = (cfg.d_vocab_out, cfg.d_model)
    return extra


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], None, ln=layer_norm(params, EMBED_LN))


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    a = p + "self_attention."
    attn = AttentionWeights(qkv=linear(params, a + "query_key_value"), q=None, k=None, v=None, o=linear(params, a + "dense"), qkv_layout="head_qkv")
    mlp = MLPWeights(w_in=linear(params, p + "mlp.dense_h_to_4h"), w_gate=None, w_out=linear(params, p + "mlp.dense_4h_to_h"))
    return LayerWeights(layer_norm(params, p + "input_layernorm"), attn, layer_norm(params, p + "post_attention_layernorm"), mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, HEAD, EMBED)  # [d_vocab_out, d_model]
    return UnembedWeights(layer_norm(params, FINAL), Affine(W_U, params.get("unembed.b_U"), in_out=False))


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_bloom_weights, as views of the leaves, plus a zero unembed.b_U (which
    HookedTransformer fills in when loading that converter's dict)."""
    n = cfg.n_heads
    W_E = params[EMBED]
    tl = {"embed.W_E": W_E, "embed.ln.w": params[EMBED_LN + ".weight"], "embed.ln.b": params[EMBED_LN + ".bias"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attention."
        tl[t + "ln1.w"], tl[t + "ln1.b"] = params[p + "input_layernorm.weight"], params[p + "input_layernorm.bias"]
        W = einops.rearrange(params[a + "query_key_value.weight"], "(i qkv h) m -> qkv i m h", i=n, qkv=3)
        b = einops.rearrange(params[a + "query_key_value.bias"], "(i qkv h) -> qkv i h", i=n, qkv=3)
        for index, key in enumerate("QKV"):
            tl[t + "attn.W_" + key] = W[index]  # [head, d_model, d_head]
        for index, key in enumerate("QKV"):
            tl[t + "attn.b_" + key] = b[index]  # [head, d_head]
        tl[t + "attn.W_O"] = einops.rearrange(params[a + "dense.weight"], "m (i h) -> i h m", i=n)
        tl[t + "attn.b_O"] = params[a + "dense.bias"]
        tl[t + "ln2.w"], tl[t + "ln2.b"] = params[p + "post_attention_layernorm.weight"], params[p + "post_attention_layernorm.bias"]
        tl[t + "mlp.W_in"], tl[t + "mlp.b_in"] = params[p + "mlp.dense_h_to_4h.weight"].T, params[p + "mlp.dense_h_to_4h.bias"]
        tl[t + "mlp.W_out"], tl[t + "mlp.b_out"] = params[p + "mlp.dense_4h_to_h.weight"].T, params[p + "mlp.dense_4h_to_h.bias"]
    tl["unembed.W_U"] = unembedding(params, HEAD, EMBED).T
    tl["ln_final.w"], tl["ln_final.b"] = params[FINAL + ".weight"], params[FINAL + ".bias"]
    b_U = params.get("unembed.b_U")
    tl["unembed.b_U"] = W_E.new_zeros(cfg.d_vocab_out) if b_U is None else b_U
    return tl


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras)."""
    from_tl = {EMBED: tl["embed.W_E"], EMBED_LN + ".weight": tl["embed.ln.w"], EMBED_LN + ".bias": tl["embed.ln.b"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attention."
        W = torch.stack([tl[t + "attn.W_" + key] for key in "QKV"])  # [qkv, head, d_model, d_head]
        b = torch.stack([tl[t + "attn.b_" + key] for key in "QKV"])  # [qkv, head, d_head]
        from_tl.update({
            p + "input_layernorm.weight": tl[t + "ln1.w"], p + "input_layernorm.bias": tl[t + "ln1.b"],
            a + "query_key_value.weight": einops.rearrange(W, "qkv i m h -> (i qkv h) m"),
            a + "query_key_value.bias": einops.rearrange(b, "qkv i h -> (i qkv h)"),
            a + "dense.weight": einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)"), a + "dense.bias": tl[t + "attn.b_O"],
            p + "post_attention_layernorm.weight": tl[t + "ln2.w"], p + "post_attention_layernorm.bias": tl[t + "ln2.b"],
            p + "mlp.dense_h_to_4h.weight": tl[t + "mlp.W_in"].T, p + "mlp.dense_h_to_4h.bias": tl[t + "mlp.b_in"],
            p + "mlp.dense_4h_to_h.weight": tl[t + "mlp.W_out"].T, p + "mlp.dense_4h_to_h.bias": tl[t + "mlp.b_out"],
        })  # fmt: skip
    from_tl.update({FINAL + ".weight": tl["ln_final.w"], FINAL + ".bias": tl["ln_final.b"], HEAD: tl["unembed.W_U"].T, "unembed.b_U": tl["unembed.b_U"]})
    return new_leaves(from_tl, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="bloom",
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
