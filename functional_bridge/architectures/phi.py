"""Phi 1/1.5/2 (PhiForCausalLM): a parallel block (attention and MLP both read the one
``input_layernorm``), partial half-split rotary, biased q/k/v/dense projections, a GELU MLP
(``fc1``/``fc2``), a final LayerNorm and a biased ``lm_head``.

As for GPT-J, TransformerLens models the single norm as an ln2 tied to ln1: its ln2.w/ln2.b are
ln1's leaves and writes go to ln1 (tl_derived_keys). ``qk_layernorm`` (a LayerNorm with weights
and biases on each head's queries and keys) is implemented, under TL's q_norm/k_norm names;
TL 3.9 has no such option. With grouped-query attention TL's keys are ``_W_K``... as Llama's.
"""

from __future__ import annotations

from typing import Collection, Mapping

import einops
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import MLPWeights
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .hf_fields import dimension_fields
from .leaves import layer_norm, linear, tied_aliases, tied_unembedding, unembedding
from .rope import rope_fields

ARCHITECTURE = "PhiForCausalLM"
EMBED, FINAL, HEAD = "model.embed_tokens.weight", "model.final_layernorm", "lm_head.weight"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "dense")
QK_NORMS = {"q_norm": "q_layernorm", "k_norm": "k_layernorm"}  # TL name -> HF module


def config_from_hf(hf) -> BridgeConfig:
    d_head = hf.hidden_size // hf.num_attention_heads
    if getattr(hf, "head_dim", d_head) != d_head:
        raise ValueError(f"{ARCHITECTURE} with head_dim={hf.head_dim} != hidden_size // num_attention_heads is not supported")
    return BridgeConfig(
        **dimension_fields(hf, ARCHITECTURE, d_head=d_head),
        normalization_type="LN",
        eps=hf.layer_norm_eps,
        parallel_attn_mlp=True,
        use_qk_norm=bool(getattr(hf, "qk_layernorm", False)),
        **rope_fields(hf, ARCHITECTURE, d_head, partial_rotary=True),
    )


def _block(layer: int) -> str:
    return f"model.layers.{layer}."


def _projection_shapes(cfg: BridgeConfig) -> dict[str, tuple[int, int]]:
    q, kv, d = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head, cfg.d_model
    return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "dense": (d, q)}


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        for proj, shape in _projection_shapes(cfg).items():
            shapes.update({f"{p}self_attn.{proj}.weight": shape, f"{p}self_attn.{proj}.bias": shape[:1]})
        if cfg.use_qk_norm:
            for module in QK_NORMS.values():
                shapes.update({f"{p}self_attn.{module}.weight": (cfg.d_head,), f"{p}self_attn.{module}.bias": (cfg.d_head,)})
        shapes.update({
            p + "mlp.fc1.weight": (m, d), p + "mlp.fc1.bias": (m,), p + "mlp.fc2.weight": (d, m), p + "mlp.fc2.bias": (d,),
            p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
        })  # fmt: skip
    shapes.update({FINAL + ".weight": (d,), FINAL + ".bias": (d,)})
    if not cfg.tie_word_embeddings:
        shapes[HEAD] = (cfg.d_vocab_out, d)
    shapes["lm_head.bias"] = (cfg.d_vocab_out,)
    return shapes


def extra_param_shapes(cfg: BridgeConfig) -> Shapes:
    """Only an untied head: every bias exists."""
    return {HEAD: (cfg.d_vocab_out, cfg.d_model)} if cfg.tie_word_embeddings else {}


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], None)


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    a = p + "self_attn."
    q_norm = layer_norm(params, a + "q_layernorm") if cfg.use_qk_norm else None
    k_norm = layer_norm(params, a + "k_layernorm") if cfg.use_qk_norm else None
    q, k, v, o = (linear(params, a + proj) for proj in PROJECTIONS)
    attn = AttentionWeights(qkv=None, q=q, k=k, v=v, o=o, q_norm=q_norm, k_norm=k_norm)
    mlp = MLPWeights(w_in=linear(params, p + "mlp.fc1"), w_gate=None, w_out=linear(params, p + "mlp.fc2"))
    return LayerWeights(layer_norm(params, p + "input_layernorm"), attn, None, mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, HEAD, EMBED)  # [d_vocab_out, d_model]
    return UnembedWeights(layer_norm(params, FINAL), Affine(W_U, params["lm_head.bias"], in_out=False))


def _gqa_prefix(cfg: BridgeConfig) -> str:
    return "_" if cfg.n_key_value_heads is not None else ""


def tl_weights(params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_phi_weights, as views of the leaves; with grouped-query attention the
    _W_K... keys and HookedTransformer's expansions of them; the q/k LayerNorms' w and b."""
    n, n_kv, g = cfg.n_heads, cfg.n_kv_heads, _gqa_prefix(cfg)
    tl = {"embed.W_E": params[EMBED]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attn."
        tl[t + "ln1.w"] = params[p + "input_layernorm.weight"]
        tl[t + "ln1.b"] = params[p + "input_layernorm.bias"]
        for key, proj, heads in (("Q", "q_proj", n), (g + "K", "k_proj", n_kv), (g + "V", "v_proj", n_kv)):
            W_key, b_key = (key[:-1] + prefix + key[-1] for prefix in ("W_", "b_"))
            tl[t + "attn." + W_key] = einops.rearrange(params[a + proj + ".weight"], "(i h) m -> i m h", i=heads)
            tl[t + "attn." + b_key] = params[a + proj + ".bias"].view(heads, cfg.d_head)
        if cfg.use_qk_norm:
            for name, module in QK_NORMS.items():
                tl[f"{t}attn.{name}.w"], tl[f"{t}attn.{name}.b"] = params[a + module + ".weight"], params[a + module + ".bias"]
        tl[t + "attn.W_O"] = einops.rearrange(params[a + "dense.weight"], "m (i h) -> i h m", i=n)
        tl[t + "attn.b_O"] = params[a + "dense.bias"]
        tl[t + "ln2.w"], tl[t + "ln2.b"] = tl[t + "ln1.w"], tl[t + "ln1.b"]
        tl[t + "mlp.W_in"] = params[p + "mlp.fc1.weight"].T
        tl[t + "mlp.b_in"] = params[p + "mlp.fc1.bias"]
        tl[t + "mlp.W_out"] = params[p + "mlp.fc2.weight"].T
        tl[t + "mlp.b_out"] = params[p + "mlp.fc2.bias"]
    tl["ln_final.w"], tl["ln_final.b"] = params[FINAL + ".weight"], params[FINAL + ".bias"]
    tl["unembed.W_U"] = unembedding(params, HEAD, EMBED).T
    tl["unembed.b_U"] = params["lm_head.bias"]
    if g:
        for derived, source in tl_derived_keys(cfg).items():
            if ".attn." in derived:
                tl[derived] = tl[source].repeat_interleave(n // n_kv, dim=0)
    return tl


def tl_derived_keys(cfg: BridgeConfig) -> dict[str, str]:
    """ln2 is ln1 (tied, as TL's conversion has it); expanded grouped-query keys; a tied W_U."""
    derived = {}
    for layer in range(cfg.n_layers):
        t = f"blocks.{layer}."
        derived.update({t + "ln2.w": t + "ln1.w", t + "ln2.b": t + "ln1.b"})
        if cfg.n_key_value_heads is not None:
            derived.update({f"{t}attn.{key}": f"{t}attn._{key}" for key in ("W_K", "W_V", "b_K", "b_V")})
    return derived | tied_unembedding(cfg)


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras).
    ln2 and expanded keys are read from their sources."""
    g = _gqa_prefix(cfg)
    from_tl = {EMBED: tl["embed.W_E"]}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attn."
        for key, proj in (("Q", "q_proj"), (g + "K", "k_proj"), (g + "V", "v_proj")):
            W_key, b_key = (key[:-1] + prefix + key[-1] for prefix in ("W_", "b_"))
            from_tl[a + proj + ".weight"] = einops.rearrange(tl[t + "attn." + W_key], "i m h -> (i h) m")
            from_tl[a + proj + ".bias"] = tl[t + "attn." + b_key].reshape(-1)
        from_tl[a + "dense.weight"] = einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)")
        from_tl[a + "dense.bias"] = tl[t + "attn.b_O"]
        if cfg.use_qk_norm:
            for name, module in QK_NORMS.items():
                from_tl[a + module + ".weight"], from_tl[a + module + ".bias"] = tl[f"{t}attn.{name}.w"], tl[f"{t}attn.{name}.b"]
        from_tl.update({
            p + "mlp.fc1.weight": tl[t + "mlp.W_in"].T, p + "mlp.fc1.bias": tl[t + "mlp.b_in"],
            p + "mlp.fc2.weight": tl[t + "mlp.W_out"].T, p + "mlp.fc2.bias": tl[t + "mlp.b_out"],
            p + "input_layernorm.weight": tl[t + "ln1.w"], p + "input_layernorm.bias": tl[t + "ln1.b"],
        })  # fmt: skip
    from_tl.update({
        FINAL + ".weight": tl["ln_final.w"], FINAL + ".bias": tl["ln_final.b"],
        HEAD: tl["unembed.W_U"].T, "lm_head.bias": tl["unembed.b_U"],
    })  # fmt: skip
    return new_leaves(from_tl, cfg, param_shapes(cfg), extra_param_shapes(cfg), extras)


FAMILY = Family(
    name="phi",
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
