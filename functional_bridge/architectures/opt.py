"""OPT (OPTForCausalLM): GPT-2's block with nn.Linear projections, ReLU, learned positions offset
by 2, and three options that change the math.

- Positions: HF's ``embed_positions`` has ``max_position_embeddings + 2`` rows and reads row
  ``position + 2`` (position counted over real tokens, as the bridge counts them). The forward and
  TL's ``pos_embed.W_pos`` read the rows from 2 on (TL 3.9's ``convert_opt_weights``); the two rows
  before them (HF reads row 1 at padding tokens only, whose outputs no real token sees) are the TL
  key ``pos_embed.W_pos_offset`` [2, d_model], which TL lacks, so that the TL view inverts exactly.
- ``do_layer_norm_before=False`` (OPT-350m): post-LN blocks, each LayerNorm on the residual sum
  (cfg.norm_placement "post_residual", hooks ``blocks.L.ln1.*``/``ln2.*`` on those sums, so
  ``hook_resid_mid``/``hook_resid_post`` are the normalised streams), and no final LayerNorm.
- ``word_embed_proj_dim != hidden_size`` (OPT-350m): ``project_in`` (d_embed -> d_model, after the
  token embedding, before positions; ``hook_embed`` is its output) and ``project_out`` (d_model ->
  d_embed, after the final norm; ``unembed.hook_in`` is its output). ``embed.W_E`` is then
  [d_vocab, d_embed] and ``unembed.W_U`` [d_embed, d_vocab]; the projections are the TL keys
  ``project_in.W`` [d_embed, d_model] and ``project_out.W`` [d_model, d_embed] (x @ W), which
  HookedTransformer has no place for (TL 3.9 cannot run this shape).

Also ``enable_bias=False`` (no projection or MLP biases: TL's are zeros) and
``layer_norm_elementwise_affine=False`` (weightless LayerNorms: TL's w = 1, b = 0), and
``_remove_final_layer_norm``. HF scales the query (q * d_head^-0.5) before q . k; the bridge
divides the scores: the same function, rounded differently.
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
from ..components.norms import Norm
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import linear, tied_aliases, tied_unembedding, unembedding

ARCHITECTURE = "OPTForCausalLM"
D = "model.decoder."
EMBED, POS, HEAD = D + "embed_tokens.weight", D + "embed_positions.weight", "lm_head.weight"
FINAL = D + "final_layer_norm"
POS_OFFSET = 2  # HF's OPTLearnedPositionalEmbedding.offset
ATTN = ("k_proj", "v_proj", "q_proj", "out_proj")  # HF's registration order
QKV = (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj"))
BIASED = (*(f"self_attn.{proj}" for proj in ATTN), "fc1", "fc2")


def config_from_hf(hf) -> BridgeConfig:
    if hf.activation_function not in ACTIVATIONS:
        raise ValueError(f"{ARCHITECTURE} activation_function {hf.activation_function!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if hf.hidden_size % hf.num_attention_heads:
        raise ValueError(f"hidden_size ({hf.hidden_size}) must be divisible by num_attention_heads ({hf.num_attention_heads})")
    d_head = hf.hidden_size // hf.num_attention_heads
    pre = bool(hf.do_layer_norm_before)
    proj = hf.word_embed_proj_dim
    return BridgeConfig(
        original_architecture=ARCHITECTURE,
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_head=d_head,
        d_mlp=hf.ffn_dim,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.activation_function,
        normalization_type="LN",
        eps=1e-5,  # nn.LayerNorm's default: HF's OPT passes no eps
        positional_embedding_type="standard",
        attn_scale=math.sqrt(d_head),
        qkv_bias=bool(hf.enable_bias),
        attn_out_bias=bool(hf.enable_bias),
        norm_placement="pre" if pre else "post_residual",
        final_norm=pre and not getattr(hf, "_remove_final_layer_norm", False),
        norm_affine=bool(hf.layer_norm_elementwise_affine),
        word_embed_proj_dim=None if proj in (None, hf.hidden_size) else proj,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def _block(layer: int) -> str:
    return f"{D}layers.{layer}."


def _d_embed(cfg: BridgeConfig) -> int:
    return cfg.word_embed_proj_dim or cfg.d_model


def _norm_shapes(name: str, cfg: BridgeConfig) -> Shapes:
    return {name + ".weight": (cfg.d_model,), name + ".bias": (cfg.d_model,)} if cfg.norm_affine else {}


def _linear_shapes(name: str, d_out: int, d_in: int, bias: bool) -> Shapes:
    return {name + ".weight": (d_out, d_in), **({name + ".bias": (d_out,)} if bias else {})}


def param_shapes(cfg: BridgeConfig) -> Shapes:
    """HF's registration order: the decoder's embeddings, projections and final norm come
    before its layers."""
    d, m, e, bias = cfg.d_model, cfg.d_mlp, _d_embed(cfg), cfg.qkv_bias
    shapes: Shapes = {EMBED: (cfg.d_vocab, e), POS: (cfg.n_ctx + POS_OFFSET, d)}
    if cfg.word_embed_proj_dim:
        shapes.update({D + "project_out.weight": (e, d), D + "project_in.weight": (d, e)})
    if cfg.final_norm:
        shapes.update(_norm_shapes(FINAL, cfg))
    for layer in range(cfg.n_layers):
        p = _block(layer)
        for proj in ATTN:
            shapes.update(_linear_shapes(p + "self_attn." + proj, d, d, bias))
        shapes.update(_norm_shapes(p + "self_attn_layer_norm", cfg))
        shapes.update(_linear_shapes(p + "fc1", m, d, bias))
        shapes.update(_linear_shapes(p + "fc2", d, m, bias))
        shapes.update(_norm_shapes(p + "final_layer_norm", cfg))
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.d_vocab_out, e)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """The projection and MLP biases (enable_bias=False lacks them), an unembedding bias, an untied head."""
    extra: Shapes = {}
    if not cfg.qkv_bias:
        for layer in range(cfg.n_layers):
            p = _block(layer)
            extra.update({f"{p}{name}.bias": (cfg.d_mlp if name == "fc1" else cfg.d_model,) for name in BIASED})
    extra["unembed.b_U"] = (cfg.d_vocab_out,)
    if cfg.tie_word_embeddings:
        extra[HEAD] = (cfg.d_vocab_out, _d_embed(cfg))
    return extra


def _norm(params: Params, cfg: BridgeConfig, name: str) -> Norm:
    if not cfg.norm_affine:
        return Norm(None, None, "LN")
    return Norm(params[name + ".weight"], params[name + ".bias"], "LN")


def _projection(params: Params, cfg: BridgeConfig, name: str) -> Affine | None:
    return Affine(params[D + name + ".weight"], None, in_out=False) if cfg.word_embed_proj_dim else None


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], params[POS][POS_OFFSET:], project_in=_projection(params, cfg, "project_in"))


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    a = p + "self_attn."
    q, k, v, o = (linear(params, a + proj) for proj in ("q_proj", "k_proj", "v_proj", "out_proj"))
    attn = AttentionWeights(qkv=None, q=q, k=k, v=v, o=o)
    mlp = MLPWeights(w_in=linear(params, p + "fc1"), w_gate=None, w_out=linear(params, p + "fc2"))
    ln1, ln2 = _norm(params, cfg, p + "self_attn_layer_norm"), _norm(params, cfg, p + "final_layer_norm")
    if cfg.norm_placement == "post_residual":
        return LayerWeights(None, attn, None, mlp, ln1_resid=ln1, ln2_resid=ln2)
    return LayerWeights(ln1, attn, ln2, mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, HEAD, EMBED)  # [d_vocab_out, d_embed]
    final = _norm(params, cfg, FINAL) if cfg.final_norm else None
    return UnembedWeights(final, Affine(W_U, params.get("unembed.b_U"), in_out=False), _projection(params, cfg, "project_out"))


def _tl_norm(params: Params, cfg: BridgeConfig, name: str, like: Tensor) -> tuple[Tensor, Tensor]:
    if not cfg.norm_affine:
        return like.new_ones(cfg.d_model), like.new_zeros(cfg.d_model)
    return params[name + ".weight"], params[name + ".bias"]


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_opt_weights, as views of the leaves (zeros where HF has no bias, ones and
    zeros for weightless norms), plus pos_embed.W_pos_offset and OPT-350m's projections."""
    n, h = cfg.n_heads, cfg.d_head
    W_E = params[EMBED]
    zeros = W_E.new_zeros
    tl = {"embed.W_E": W_E, "pos_embed.W_pos": params[POS][POS_OFFSET:], "pos_embed.W_pos_offset": params[POS][:POS_OFFSET]}
    if cfg.word_embed_proj_dim:
        tl["project_in.W"] = params[D + "project_in.weight"].T  # [d_embed, d_model]
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attn."
        tl[t + "ln1.w"], tl[t + "ln1.b"] = _tl_norm(params, cfg, p + "self_attn_layer_norm", W_E)
        for key, proj in QKV:
            tl[t + "attn.W_" + key] = einops.rearrange(params[a + proj + ".weight"], "(i h) m -> i m h", i=n)
        for key, proj in QKV:
            bias = params.get(a + proj + ".bias")
            tl[t + "attn.b_" + key] = zeros(n, h) if bias is None else bias.view(n, h)
        tl[t + "attn.W_O"] = einops.rearrange(params[a + "out_proj.weight"], "m (i h) -> i h m", i=n)
        tl[t + "attn.b_O"] = params.get(a + "out_proj.bias", zeros(cfg.d_model))
        tl[t + "ln2.w"], tl[t + "ln2.b"] = _tl_norm(params, cfg, p + "final_layer_norm", W_E)
        tl[t + "mlp.W_in"], tl[t + "mlp.W_out"] = params[p + "fc1.weight"].T, params[p + "fc2.weight"].T
        tl[t + "mlp.b_in"] = params.get(p + "fc1.bias", zeros(cfg.d_mlp))
        tl[t + "mlp.b_out"] = params.get(p + "fc2.bias", zeros(cfg.d_model))
    if cfg.final_norm:
        tl["ln_final.w"], tl["ln_final.b"] = _tl_norm(params, cfg, FINAL, W_E)
    if cfg.word_embed_proj_dim:
        tl["project_out.W"] = params[D + "project_out.weight"].T  # [d_model, d_embed]
    tl["unembed.W_U"] = unembedding(params, HEAD, EMBED).T
    tl["unembed.b_U"] = params.get("unembed.b_U", zeros(cfg.d_vocab_out))
    return tl


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras).
    Weightless norms' unit weights and zero biases not requested as extras are not read."""
    from_tl = {EMBED: tl["embed.W_E"], POS: torch.cat([tl["pos_embed.W_pos_offset"], tl["pos_embed.W_pos"]])}
    if cfg.word_embed_proj_dim:
        from_tl[D + "project_in.weight"], from_tl[D + "project_out.weight"] = tl["project_in.W"].T, tl["project_out.W"].T
    norms = {"ln1": "self_attn_layer_norm", "ln2": "final_layer_norm"}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attn."
        for key, proj in QKV:
            from_tl[a + proj + ".weight"] = einops.rearrange(tl[t + "attn.W_" + key], "i m h -> (i h) m")
            from_tl[a + proj + ".bias"] = tl[t + "attn.b_" + key].reshape(-1)
        for tl_name, hf_name in norms.items():
            from_tl[p + hf_name + ".weight"], from_tl[p + hf_name + ".bias"] = tl[t + tl_name + ".w"], tl[t + tl_name + ".b"]
        from_tl.update({
            a + "out_proj.weight": einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)"), a + "out_proj.bias": tl[t + "attn.b_O"],
            p + "fc1.weight": tl[t + "mlp.W_in"].T, p + "fc1.bias": tl[t + "mlp.b_in"],
            p + "fc2.weight": tl[t + "mlp.W_out"].T, p + "fc2.bias": tl[t + "mlp.b_out"],
        })  # fmt: skip
    if cfg.final_norm:
        from_tl[FINAL + ".weight"], from_tl[FINAL + ".bias"] = tl["ln_final.w"], tl["ln_final.b"]
    from_tl.update({HEAD: tl["unembed.W_U"].T, "unembed.b_U": tl["unembed.b_U"]})
    return new_leaves(from_tl, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="opt",
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
