"""GPT-Neo (GPTNeoForCausalLM): GPT-2's block with nn.Linear projections, learned positions,
unscaled attention (scores are q . k, no 1/sqrt(d_head)), unbiased q/k/v, and layers alternating
global and local (sliding-window) attention as ``config.attention_layers`` says.

HF's windowed layers let query i see keys j with 0 <= i - j < window_size: the bridge's window.
HF's GPT-Neo counts positions 0..seq-1 whatever the padding mask; the bridge counts real tokens
(its documented rule), so a left-padded row's logits equal that row run alone through HF, not HF's
logits for the padded batch. TL's views follow TL 3.9's ``convert_neo_weights`` (zero q/k/v and
unembedding biases, which processing may turn into leaves).
"""

from __future__ import annotations

from typing import Collection, Mapping

import einops
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import ACTIVATIONS, MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import layer_norm, linear, tied_aliases, tied_unembedding, unembedding

ARCHITECTURE = "GPTNeoForCausalLM"
EMBED, POS, HEAD = "transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"
QKV = (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj"))


def config_from_hf(hf) -> BridgeConfig:
    if hf.activation_function not in ACTIVATIONS:
        raise ValueError(f"{ARCHITECTURE} activation_function {hf.activation_function!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    types = tuple(hf.attention_layers)
    if set(types) - {"global", "local"}:
        raise ValueError(f"{ARCHITECTURE} attention_layers {sorted(set(types))} is not supported; supported: 'global', 'local'")
    if hf.hidden_size % hf.num_heads:
        raise ValueError(f"hidden_size ({hf.hidden_size}) must be divisible by num_heads ({hf.num_heads})")
    return BridgeConfig(
        original_architecture=ARCHITECTURE,
        n_layers=hf.num_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_heads,
        d_head=hf.hidden_size // hf.num_heads,
        d_mlp=hf.intermediate_size if hf.intermediate_size is not None else 4 * hf.hidden_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=hf.activation_function,
        normalization_type="LN",
        eps=hf.layer_norm_epsilon,
        positional_embedding_type="standard",
        attn_scale=1.0,  # GPT-Neo does not scale its attention scores
        qkv_bias=False,
        window_size=hf.window_size if "local" in types else None,
        attn_types=types if "local" in types else None,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
    )


def _block(layer: int) -> str:
    return f"transformer.h.{layer}."


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d), POS: (cfg.n_ctx, d)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        a = p + "attn.attention."
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,)})
        shapes.update({f"{a}{proj}.weight": (d, d) for proj in ("k_proj", "v_proj", "q_proj", "out_proj")})
        shapes.update({
            a + "out_proj.bias": (d,), p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (m, d), p + "mlp.c_fc.bias": (m,), p + "mlp.c_proj.weight": (d, m), p + "mlp.c_proj.bias": (d,),
        })  # fmt: skip
    shapes.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.d_vocab_out, d)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """q/k/v biases (HF's GPT-Neo has none), an unembedding bias, an untied head."""
    extra: Shapes = {f"{_block(layer)}attn.attention.{proj}.bias": (cfg.d_model,) for layer in range(cfg.n_layers) for _, proj in QKV}
    extra["unembed.b_U"] = (cfg.d_vocab_out,)
    if cfg.tie_word_embeddings:
        extra[HEAD] = (cfg.d_vocab_out, cfg.d_model)
    return extra


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], params[POS])


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    a = p + "attn.attention."
    q, k, v, o = (linear(params, a + proj) for proj in ("q_proj", "k_proj", "v_proj", "out_proj"))
    attn = AttentionWeights(qkv=None, q=q, k=k, v=v, o=o)
    mlp = MLPWeights(w_in=linear(params, p + "mlp.c_fc"), w_gate=None, w_out=linear(params, p + "mlp.c_proj"))
    return LayerWeights(layer_norm(params, p + "ln_1"), attn, layer_norm(params, p + "ln_2"), mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, HEAD, EMBED)  # [d_vocab_out, d_model]
    return UnembedWeights(layer_norm(params, "transformer.ln_f"), Affine(W_U, params.get("unembed.b_U"), in_out=False))


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_neo_weights, as views of the leaves (zeros where HF has no bias)."""
    n, h = cfg.n_heads, cfg.d_head
    W_E = params[EMBED]
    tl = {"embed.W_E": W_E, "pos_embed.W_pos": params[POS][: cfg.n_ctx]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "attn.attention."
        tl[t + "ln1.w"], tl[t + "ln1.b"] = params[p + "ln_1.weight"], params[p + "ln_1.bias"]
        for key, proj in QKV:
            tl[t + "attn.W_" + key] = einops.rearrange(params[a + proj + ".weight"], "(i h) m -> i m h", i=n)
        for key, proj in QKV:
            bias = params.get(a + proj + ".bias")
            tl[t + "attn.b_" + key] = W_E.new_zeros(n, h) if bias is None else bias.view(n, h)
        tl[t + "attn.W_O"] = einops.rearrange(params[a + "out_proj.weight"], "m (i h) -> i h m", i=n)
        tl[t + "attn.b_O"] = params[a + "out_proj.bias"]
        tl[t + "ln2.w"], tl[t + "ln2.b"] = params[p + "ln_2.weight"], params[p + "ln_2.bias"]
        tl[t + "mlp.W_in"], tl[t + "mlp.b_in"] = params[p + "mlp.c_fc.weight"].T, params[p + "mlp.c_fc.bias"]
        tl[t + "mlp.W_out"], tl[t + "mlp.b_out"] = params[p + "mlp.c_proj.weight"].T, params[p + "mlp.c_proj.bias"]
    tl["ln_final.w"], tl["ln_final.b"] = params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]
    tl["unembed.W_U"] = unembedding(params, HEAD, EMBED).T
    b_U = params.get("unembed.b_U")
    tl["unembed.b_U"] = W_E.new_zeros(cfg.d_vocab_out) if b_U is None else b_U
    return tl


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras)."""
    from_tl = {EMBED: tl["embed.W_E"], POS: tl["pos_embed.W_pos"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "attn.attention."
        for key, proj in QKV:
            from_tl[a + proj + ".weight"] = einops.rearrange(tl[t + "attn.W_" + key], "i m h -> (i h) m")
            from_tl[a + proj + ".bias"] = tl[t + "attn.b_" + key].reshape(-1)
        from_tl.update({
            p + "ln_1.weight": tl[t + "ln1.w"], p + "ln_1.bias": tl[t + "ln1.b"],
            a + "out_proj.weight": einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)"), a + "out_proj.bias": tl[t + "attn.b_O"],
            p + "ln_2.weight": tl[t + "ln2.w"], p + "ln_2.bias": tl[t + "ln2.b"],
            p + "mlp.c_fc.weight": tl[t + "mlp.W_in"].T, p + "mlp.c_fc.bias": tl[t + "mlp.b_in"],
            p + "mlp.c_proj.weight": tl[t + "mlp.W_out"].T, p + "mlp.c_proj.bias": tl[t + "mlp.b_out"],
        })  # fmt: skip
    from_tl.update({
        "transformer.ln_f.weight": tl["ln_final.w"], "transformer.ln_f.bias": tl["ln_final.b"],
        HEAD: tl["unembed.W_U"].T, "unembed.b_U": tl["unembed.b_U"],
    })  # fmt: skip
    return new_leaves(from_tl, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="gpt_neo",
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
