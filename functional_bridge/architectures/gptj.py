"""GPT-J (GPTJForCausalLM): one LayerNorm per parallel block, adjacent-pair partial rotary.

Attention and MLP both read ``ln_1``'s output (LayerWeights.ln2 is None); TransformerLens
models that as an ln2 tied to ln1, so its ln2.w/ln2.b are ln_1's leaves and writes go to ln1
(tl_derived_keys). q/k/v/out projections have no bias (TL's are zeros); lm_head has one. The
rotary base is fixed at 10000 in HF's GPT-J.
"""

from __future__ import annotations

import math
from typing import Collection, Mapping

import einops
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import ACTIVATIONS, MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import layer_norm, linear, tied_aliases, tied_unembedding, unembedding

ARCHITECTURE = "GPTJForCausalLM"
EMBED, HEAD = "transformer.wte.weight", "lm_head.weight"
PROJECTIONS = ("k_proj", "v_proj", "q_proj", "out_proj")  # HF's registration order


def config_from_hf(hf) -> BridgeConfig:
    if hf.activation_function not in ACTIVATIONS:
        raise ValueError(
            f"{ARCHITECTURE} activation_function {hf.activation_function!r} is not supported; "
            f"supported: {sorted(ACTIVATIONS)}"
        )
    if hf.n_embd % hf.n_head:
        raise ValueError(f"n_embd ({hf.n_embd}) must be divisible by n_head ({hf.n_head})")
    d_head = hf.n_embd // hf.n_head
    rotary_dim = hf.rotary_dim
    if rotary_dim is None or rotary_dim % 2 or not 0 < rotary_dim <= d_head:
        raise ValueError(f"{ARCHITECTURE} rotary_dim={rotary_dim} is not supported: it must be even and in (0, d_head={d_head}]")
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
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim,
        rotary_base=10000.0,
        rotary_adjacent_pairs=True,
        attn_scale=math.sqrt(d_head),
        parallel_attn_mlp=True,
        qkv_bias=False,
        attn_out_bias=False,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )


def _block(layer: int) -> str:
    return f"transformer.h.{layer}."


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        shapes.update({p + "ln_1.weight": (d,), p + "ln_1.bias": (d,)})
        shapes.update({f"{p}attn.{proj}.weight": (d, d) for proj in PROJECTIONS})
        shapes.update({
            p + "mlp.fc_in.weight": (m, d), p + "mlp.fc_in.bias": (m,),
            p + "mlp.fc_out.weight": (d, m), p + "mlp.fc_out.bias": (d,),
        })  # fmt: skip
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["transformer.ln_f.bias"] = (d,)
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.d_vocab_out, d)
    shapes["lm_head.bias"] = (cfg.d_vocab_out,)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """Attention projection biases (HF's GPT-J has none) and an untied head."""
    extra: Shapes = {f"{_block(layer)}attn.{proj}.bias": (cfg.d_model,) for layer in range(cfg.n_layers) for proj in PROJECTIONS}
    if cfg.tie_word_embeddings:
        extra[HEAD] = (cfg.d_vocab_out, cfg.d_model)
    return extra


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], None)


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    a = p + "attn."
    attn = AttentionWeights(
        qkv=None, q=linear(params, a + "q_proj"), k=linear(params, a + "k_proj"), v=linear(params, a + "v_proj"),
        o=linear(params, a + "out_proj"),
    )  # fmt: skip
    mlp = MLPWeights(w_in=linear(params, p + "mlp.fc_in"), w_gate=None, w_out=linear(params, p + "mlp.fc_out"))
    return LayerWeights(layer_norm(params, p + "ln_1"), attn, None, mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, HEAD, EMBED)  # [d_vocab_out, d_model]
    return UnembedWeights(layer_norm(params, "transformer.ln_f"), Affine(W_U, params["lm_head.bias"], in_out=False))


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_gptj_weights, as views of the leaves (zeros where HF has no bias)."""
    n, h, d = cfg.n_heads, cfg.d_head, cfg.d_model
    W_E = params[EMBED]
    tl = {"embed.W_E": W_E}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        tl[t + "ln1.w"] = params[p + "ln_1.weight"]
        tl[t + "ln1.b"] = params[p + "ln_1.bias"]
        for key, proj in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
            tl[t + "attn.W_" + key] = einops.rearrange(params[f"{p}attn.{proj}.weight"], "(i h) m -> i m h", i=n)
        for key, proj in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
            bias = params.get(f"{p}attn.{proj}.bias")
            tl[t + "attn.b_" + key] = W_E.new_zeros(n, h) if bias is None else bias.view(n, h)
        tl[t + "attn.W_O"] = einops.rearrange(params[p + "attn.out_proj.weight"], "m (i h) -> i h m", i=n)
        b_O = params.get(p + "attn.out_proj.bias")
        tl[t + "attn.b_O"] = W_E.new_zeros(d) if b_O is None else b_O
        tl[t + "ln2.w"] = tl[t + "ln1.w"]
        tl[t + "ln2.b"] = tl[t + "ln1.b"]
        tl[t + "mlp.W_in"] = params[p + "mlp.fc_in.weight"].T
        tl[t + "mlp.b_in"] = params[p + "mlp.fc_in.bias"]
        tl[t + "mlp.W_out"] = params[p + "mlp.fc_out.weight"].T
        tl[t + "mlp.b_out"] = params[p + "mlp.fc_out.bias"]
    tl["ln_final.w"] = params["transformer.ln_f.weight"]
    tl["ln_final.b"] = params["transformer.ln_f.bias"]
    tl["unembed.W_U"] = unembedding(params, HEAD, EMBED).T
    tl["unembed.b_U"] = params["lm_head.bias"]
    return tl


def tl_derived_keys(cfg: BridgeConfig) -> dict[str, str]:
    """ln2 is ln1 (tied, as TL's conversion has it); a tied W_U is embed.W_E."""
    derived = {}
    for layer in range(cfg.n_layers):
        t = f"blocks.{layer}."
        derived.update({t + "ln2.w": t + "ln1.w", t + "ln2.b": t + "ln1.b"})
    return derived | tied_unembedding(cfg)


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras).
    ln2 is read from ln1 (its source); zero attention biases only when requested as extras."""
    from_tl = {EMBED: tl["embed.W_E"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        from_tl[p + "ln_1.weight"] = tl[t + "ln1.w"]
        from_tl[p + "ln_1.bias"] = tl[t + "ln1.b"]
        for key, proj in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
            from_tl[f"{p}attn.{proj}.weight"] = einops.rearrange(tl[t + "attn.W_" + key], "i m h -> (i h) m")
            from_tl[f"{p}attn.{proj}.bias"] = tl[t + "attn.b_" + key].reshape(-1)
        from_tl[p + "attn.out_proj.weight"] = einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)")
        from_tl[p + "attn.out_proj.bias"] = tl[t + "attn.b_O"]
        from_tl.update({
            p + "mlp.fc_in.weight": tl[t + "mlp.W_in"].T, p + "mlp.fc_in.bias": tl[t + "mlp.b_in"],
            p + "mlp.fc_out.weight": tl[t + "mlp.W_out"].T, p + "mlp.fc_out.bias": tl[t + "mlp.b_out"],
        })  # fmt: skip
    from_tl.update({
        "transformer.ln_f.weight": tl["ln_final.w"], "transformer.ln_f.bias": tl["ln_final.b"],
        HEAD: tl["unembed.W_U"].T, "lm_head.bias": tl["unembed.b_U"],
    })  # fmt: skip
    return new_leaves(from_tl, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="gptj",
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
    tl_derived_keys=tl_derived_keys,
)
