"""The Llama-layout decoder, shared by Llama, Mistral, Qwen2/3, Gemma 1/2/3, OLMo/OLMo 2, Mixtral
and Phi-3: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` (Phi-3: a fused
``qkv_proj``), an MLP (``mlp.{gate,up,down}_proj``; Phi-3: ``gate_up_proj``; Mixtral: a router
``mlp.gate`` and fused 3-D experts), per-layer norms, ``model.norm``, ``lm_head``.

The families differ by data: a Layout (which norms exist, where they apply and what TL calls
them; how their weights apply; fused projections; experts; Gemma's embedding scale) and the
BridgeConfig (biases, grouped-query heads, q/k norms, windows, rotary). TL's views follow TL 3.9's
converters: with grouped-query attention TL's keys are ``_W_K``/``_W_V``/``_b_K``/``_b_V`` (views)
and ``W_K``... are HookedTransformer's repeat_interleave expansions of them. Gemma's are not
views: TL folds the embedding scale into ``embed.W_E`` (W_E * sqrt(d_model) in the model dtype)
and the norms' 1 into their weights (w + 1 in float32), so ``hf_from_tl`` divides and subtracts,
which rounds (see hf_from_tl).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping

import einops
import torch
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import MLPWeights
from ..components.moe import MoEWeights
from ..components.norms import Norm
from ..config import BridgeConfig
from .family import EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import linear, tied_aliases, tied_unembedding, unembedding

EMBED, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class NormSlot:
    tl: str  # TL's name in the block: "ln1", "ln1_post", ...
    leaf: str | None  # the HF module in the layer ("input_layernorm"); None: no weights (OLMo)
    place: str  # the LayerWeights field it fills: "ln1", "ln2", "ln1_post" or "ln2_post"


LLAMA_NORMS = (NormSlot("ln1", "input_layernorm", "ln1"), NormSlot("ln2", "post_attention_layernorm", "ln2"))


@dataclass(frozen=True)
class Layout:
    norms: tuple[NormSlot, ...] = LLAMA_NORMS  # in HF's registration order
    norm_kind: str = "RMS"  # "LN": OLMo's non-parametric LayerNorm (every slot's leaf is None)
    plus_one: bool = False  # norms scale by (1 + w) in float32 (Gemma)
    float32_weight: bool = False  # norms apply w in float32 before the cast (OLMo 2)
    fused: bool = False  # qkv_proj (registered after o_proj) and gate_up_proj (Phi-3)
    moe: bool = False  # mlp.gate router and mlp.experts.{gate_up,down}_proj (Mixtral)
    embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)


def _block(layer: int) -> str:
    return f"model.layers.{layer}."


def _projection_shapes(cfg: BridgeConfig) -> dict[str, tuple[int, int]]:
    """self_attn projection -> (d_out, d_in)."""
    q, kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    return {"q_proj": (q, cfg.d_model), "k_proj": (kv, cfg.d_model), "v_proj": (kv, cfg.d_model), "o_proj": (cfg.d_model, q)}


def _has_bias(cfg: BridgeConfig, proj: str) -> bool:
    return cfg.attn_out_bias if proj == "o_proj" else cfg.qkv_bias


def _qk_norm_shapes(cfg: BridgeConfig) -> tuple[tuple[int], tuple[int]]:
    if cfg.qk_norm_over_heads:
        return (cfg.n_heads * cfg.d_head,), (cfg.n_kv_heads * cfg.d_head,)
    return (cfg.d_head,), (cfg.d_head,)


def param_shapes(layout: Layout, cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {EMBED: (cfg.d_vocab, d)}
    for layer in range(cfg.n_layers):
        p = _block(layer)
        proj = _projection_shapes(cfg)
        if layout.fused:
            shapes[p + "self_attn.o_proj.weight"] = proj["o_proj"]
            shapes[p + "self_attn.qkv_proj.weight"] = (sum(proj[x][0] for x in PROJECTIONS[:3]), d)
        else:
            for name, shape in proj.items():
                shapes[f"{p}self_attn.{name}.weight"] = shape
                if _has_bias(cfg, name):
                    shapes[f"{p}self_attn.{name}.bias"] = shape[:1]
        if cfg.use_qk_norm:
            shapes[p + "self_attn.q_norm.weight"], shapes[p + "self_attn.k_norm.weight"] = _qk_norm_shapes(cfg)
        if layout.moe:
            shapes[p + "mlp.gate.weight"] = (cfg.num_experts, d)
            shapes[p + "mlp.experts.gate_up_proj"] = (cfg.num_experts, 2 * m, d)
            shapes[p + "mlp.experts.down_proj"] = (cfg.num_experts, d, m)
        elif layout.fused:
            shapes.update({p + "mlp.gate_up_proj.weight": (2 * m, d), p + "mlp.down_proj.weight": (d, m)})
        else:
            shapes.update({p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d), p + "mlp.down_proj.weight": (d, m)})
        shapes.update({f"{p}{slot.leaf}.weight": (d,) for slot in layout.norms if slot.leaf})
    if layout.norm_kind == "RMS":
        shapes[FINAL_NORM] = (d,)
    if not cfg.tie_word_embeddings:
        shapes[LM_HEAD] = (cfg.d_vocab_out, d)
    return shapes


def extra_param_shapes(layout: Layout, cfg: BridgeConfig) -> Shapes:
    """Projection biases this config's HF layout lacks (Phi-3's fused qkv_proj too), an
    unembedding bias, an untied head."""
    extra: Shapes = {}
    proj = _projection_shapes(cfg)
    for layer in range(cfg.n_layers):
        a = _block(layer) + "self_attn."
        if layout.fused:
            extra[a + "qkv_proj.bias"] = (sum(proj[x][0] for x in PROJECTIONS[:3]),)
            extra[a + "o_proj.bias"] = (cfg.d_model,)
            continue
        for name, shape in proj.items():
            if not _has_bias(cfg, name):
                extra[f"{a}{name}.bias"] = shape[:1]
    extra["unembed.b_U"] = (cfg.d_vocab_out,)
    if cfg.tie_word_embeddings:
        extra[LM_HEAD] = (cfg.d_vocab_out, cfg.d_model)
    return extra


def _norm(layout: Layout, params: Params, name: str | None) -> Norm:
    if name is None:
        return Norm(None, None, layout.norm_kind)
    return Norm(params[name], None, layout.norm_kind, layout.plus_one, layout.float32_weight)


def embed_weights(layout: Layout, params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[EMBED], None, scale=cfg.d_model**0.5 if layout.embed_scale else None)


def _split_rows(weight: Tensor, sizes: list[int]) -> list[Affine]:
    return [Affine(part, None, in_out=False) for part in weight.split(sizes, dim=0)]


def layer_weights(layout: Layout, params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    p = _block(layer)
    a = p + "self_attn."
    q_norm = _norm(layout, params, a + "q_norm.weight") if cfg.use_qk_norm else None
    k_norm = _norm(layout, params, a + "k_norm.weight") if cfg.use_qk_norm else None
    if layout.fused:  # qkv_proj's rows are [q heads | k heads | v heads]
        qkv, o = linear(params, a + "qkv_proj"), linear(params, a + "o_proj")
        attn = AttentionWeights(qkv=qkv, q=None, k=None, v=None, o=o, q_norm=q_norm, k_norm=k_norm)
    else:
        q, k, v, o = (linear(params, a + name) for name in PROJECTIONS)
        attn = AttentionWeights(qkv=None, q=q, k=k, v=v, o=o, q_norm=q_norm, k_norm=k_norm)
    m = p + "mlp."
    if layout.moe:
        mlp = MoEWeights(linear(params, m + "gate"), params[m + "experts.gate_up_proj"], params[m + "experts.down_proj"], cfg.experts_per_token)
    elif layout.fused:
        mlp = MLPWeights(w_in=None, w_gate=None, w_out=linear(params, m + "down_proj"), gate_up=linear(params, m + "gate_up_proj"))
    else:
        mlp = MLPWeights(w_in=linear(params, m + "up_proj"), w_gate=linear(params, m + "gate_proj"), w_out=linear(params, m + "down_proj"))
    norms = {slot.place: _norm(layout, params, slot.leaf and f"{p}{slot.leaf}.weight") for slot in layout.norms}
    return LayerWeights(attn=attn, mlp=mlp, **{place: norms.get(place) for place in ("ln1", "ln2", "ln1_post", "ln2_post")})


def unembed_weights(layout: Layout, params: Params, cfg: BridgeConfig) -> UnembedWeights:
    W_U = unembedding(params, LM_HEAD, EMBED)  # [d_vocab_out, d_model]
    final = _norm(layout, params, FINAL_NORM if layout.norm_kind == "RMS" else None)
    return UnembedWeights(final, Affine(W_U, params.get("unembed.b_U"), in_out=False))


def _gqa_prefix(cfg: BridgeConfig) -> str:
    return "_" if cfg.n_key_value_heads is not None else ""


def _heads_in(W: Tensor, n: int) -> Tensor:
    """nn.Linear weight [n * d_head, d_model] -> [n, d_model, d_head] (a view)."""
    return einops.rearrange(W, "(n h) m -> n m h", n=n)


def _tl_norm(layout: Layout, leaf: Tensor) -> Tensor:
    """TL's norm weight: the leaf, or (Gemma) 1 + w in float32, as TL's convert_gemma_weights
    (float64 leaves stay float64 here, where TL's converter rounds them to float32)."""
    if not layout.plus_one:
        return leaf
    return (leaf if leaf.dtype == torch.float64 else leaf.float()) + 1.0


def _hf_norm(layout: Layout, tl_w: Tensor, dtype: torch.dtype) -> Tensor:
    return (tl_w - 1.0).to(dtype) if layout.plus_one else tl_w


def _embed_scale(cfg: BridgeConfig, dtype: torch.dtype) -> Tensor:
    """TL's scale of embed.W_E: sqrt(d_model) in the model dtype."""
    return torch.tensor(cfg.d_model**0.5, dtype=dtype)


def tl_weights(layout: Layout, params: Params, cfg: BridgeConfig) -> dict[str, Tensor]:
    """TL 3.9's convert_{llama,mistral,qwen2,qwen3,gemma,olmo,olmo2,mixtral,phi3}_weights (zeros
    where HF has no bias, ones for OLMo's weightless norms), plus HookedTransformer's expanded
    W_K/W_V/b_K/b_V under grouped-query attention. Unlike TL's converters, biases HF does have
    (attention_bias=True) are read."""
    W_E = params[EMBED]
    zeros, ones = W_E.new_zeros, W_E.new_ones
    n, n_kv, h, g = cfg.n_heads, cfg.n_kv_heads, cfg.d_head, _gqa_prefix(cfg)
    tl = {"embed.W_E": W_E * _embed_scale(cfg, W_E.dtype) if layout.embed_scale else W_E}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attn."
        for slot in layout.norms:
            if slot.leaf is None:  # OLMo: TL's LayerNorm with w = 1, b = 0
                tl[f"{t}{slot.tl}.w"], tl[f"{t}{slot.tl}.b"] = ones(cfg.d_model), zeros(cfg.d_model)
            else:
                tl[f"{t}{slot.tl}.w"] = _tl_norm(layout, params[f"{p}{slot.leaf}.weight"])
        sizes = [n * h, n_kv * h, n_kv * h]
        if layout.fused:
            W_Q, W_K, W_V = params[a + "qkv_proj.weight"].split(sizes, dim=0)
            fused_bias = params.get(a + "qkv_proj.bias")
            biases = (None,) * 3 if fused_bias is None else fused_bias.split(sizes)
        else:
            W_Q, W_K, W_V = (params[a + name + ".weight"] for name in PROJECTIONS[:3])
            biases = tuple(params.get(a + name + ".bias") for name in PROJECTIONS[:3])
        tl[t + "attn.W_Q"], tl[t + f"attn.{g}W_K"], tl[t + f"attn.{g}W_V"] = _heads_in(W_Q, n), _heads_in(W_K, n_kv), _heads_in(W_V, n_kv)
        if cfg.use_qk_norm:
            tl[t + "attn.q_norm.w"] = _tl_norm(layout, params[a + "q_norm.weight"])
            tl[t + "attn.k_norm.w"] = _tl_norm(layout, params[a + "k_norm.weight"])
        for key, bias, heads in zip(("b_Q", f"{g}b_K", f"{g}b_V"), biases, (n, n_kv, n_kv)):
            tl[t + "attn." + key] = zeros(heads, h) if bias is None else bias.view(heads, h)
        tl[t + "attn.W_O"] = einops.rearrange(params[a + "o_proj.weight"], "m (n h) -> n h m", n=n)
        b_O = params.get(a + "o_proj.bias")
        tl[t + "attn.b_O"] = zeros(cfg.d_model) if b_O is None else b_O
        tl.update(_tl_mlp(layout, params, cfg, p + "mlp.", t + "mlp."))
    if layout.norm_kind == "RMS":
        tl["ln_final.w"] = _tl_norm(layout, params[FINAL_NORM])
    else:
        tl["ln_final.w"], tl["ln_final.b"] = ones(cfg.d_model), zeros(cfg.d_model)
    tl["unembed.W_U"] = unembedding(params, LM_HEAD, EMBED).T
    b_U = params.get("unembed.b_U")
    tl["unembed.b_U"] = zeros(cfg.d_vocab_out) if b_U is None else b_U
    if g:
        group = n // n_kv
        for derived, source in tl_derived_keys(cfg).items():
            if source != "embed.W_E":
                tl[derived] = tl[source] if group == 1 else tl[source].repeat_interleave(group, dim=0)
    return tl


def _tl_mlp(layout: Layout, params: Params, cfg: BridgeConfig, m: str, t: str) -> dict[str, Tensor]:
    """TL's MLP keys: a gated MLP's W_in/W_gate/W_out (zero b_in/b_out), or Mixtral's router
    ``W_gate.weight`` and per-expert nn.Linear weights (views of the fused leaves)."""
    if layout.moe:
        tl = {t + "W_gate.weight": params[m + "gate.weight"]}
        gate_up, down = params[m + "experts.gate_up_proj"], params[m + "experts.down_proj"]
        for e in range(cfg.num_experts):
            tl[f"{t}experts.{e}.W_gate.weight"] = gate_up[e, : cfg.d_mlp]
            tl[f"{t}experts.{e}.W_in.weight"] = gate_up[e, cfg.d_mlp :]
            tl[f"{t}experts.{e}.W_out.weight"] = down[e]
        return tl
    if layout.fused:
        W_gate, W_in = params[m + "gate_up_proj.weight"].T.tensor_split(2, dim=1)
    else:
        W_gate, W_in = params[m + "gate_proj.weight"].T, params[m + "up_proj.weight"].T
    zeros = W_in.new_zeros
    W_out = params[m + "down_proj.weight"].T
    return {t + "W_in": W_in, t + "W_gate": W_gate, t + "b_in": zeros(cfg.d_mlp), t + "W_out": W_out, t + "b_out": zeros(cfg.d_model)}


def tl_derived_keys(cfg: BridgeConfig) -> dict[str, str]:
    """Expanded grouped-query keys -> their _-prefixed sources; a tied W_U -> embed.W_E."""
    derived = {}
    if cfg.n_key_value_heads is not None:
        for layer in range(cfg.n_layers):
            t = f"blocks.{layer}.attn."
            derived.update({t + key: t + "_" + key for key in ("W_K", "W_V", "b_K", "b_V")})
    return derived | tied_unembedding(cfg)


def hf_from_tl(layout: Layout, tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict[str, Tensor]:
    """Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extras).
    TL tensors with no HF slot (zero biases not requested as extras, the gated MLP's b_in and
    b_out, OLMo's unit norms) are not read; derived keys (expanded W_K, a tied W_U) are read from
    their sources. Exact, except Gemma's: its embedding is divided by the scale and its norms
    lose the 1 (in the leaves' dtype), each within a rounding of the TL value."""
    g = _gqa_prefix(cfg)
    dtype = tl["blocks.0.attn.W_Q"].dtype if cfg.n_layers else tl["embed.W_E"].dtype
    W_E = tl["embed.W_E"]
    hf = {EMBED: W_E / _embed_scale(cfg, W_E.dtype) if layout.embed_scale else W_E}
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        a = p + "self_attn."
        W = {proj: einops.rearrange(tl[t + "attn." + key], "n m h -> (n h) m") for proj, key in (("q_proj", "W_Q"), ("k_proj", g + "W_K"), ("v_proj", g + "W_V"))}
        b = {proj: tl[t + "attn." + key].reshape(-1) for proj, key in (("q_proj", "b_Q"), ("k_proj", g + "b_K"), ("v_proj", g + "b_V"))}
        if layout.fused:
            hf[a + "qkv_proj.weight"] = torch.cat(list(W.values()))
            hf[a + "qkv_proj.bias"] = torch.cat(list(b.values()))  # an extra
        else:
            for proj in W:
                hf[f"{a}{proj}.weight"], hf[f"{a}{proj}.bias"] = W[proj], b[proj]  # a bias: a leaf or an extra
        hf[a + "o_proj.weight"] = einops.rearrange(tl[t + "attn.W_O"], "n h m -> m (n h)")
        hf[a + "o_proj.bias"] = tl[t + "attn.b_O"]
        if cfg.use_qk_norm:
            hf[a + "q_norm.weight"] = _hf_norm(layout, tl[t + "attn.q_norm.w"], dtype)
            hf[a + "k_norm.weight"] = _hf_norm(layout, tl[t + "attn.k_norm.w"], dtype)
        hf.update(_hf_mlp(layout, tl, cfg, p + "mlp.", t + "mlp."))
        for slot in layout.norms:
            if slot.leaf:
                hf[f"{p}{slot.leaf}.weight"] = _hf_norm(layout, tl[f"{t}{slot.tl}.w"], dtype)
    if layout.norm_kind == "RMS":
        hf[FINAL_NORM] = _hf_norm(layout, tl["ln_final.w"], dtype)
    hf[LM_HEAD] = tl["unembed.W_U"].T  # a leaf when untied, else an extra
    hf["unembed.b_U"] = tl["unembed.b_U"]
    return new_leaves(hf, cfg, param_shapes(layout, cfg), extra_param_shapes(layout, cfg), extras)


def _hf_mlp(layout: Layout, tl: Mapping[str, Tensor], cfg: BridgeConfig, m: str, t: str) -> dict[str, Tensor]:
    if layout.moe:
        experts = range(cfg.num_experts)
        gate_up = [torch.cat([tl[f"{t}experts.{e}.W_gate.weight"], tl[f"{t}experts.{e}.W_in.weight"]]) for e in experts]
        down = [tl[f"{t}experts.{e}.W_out.weight"] for e in experts]
        return {m + "gate.weight": tl[t + "W_gate.weight"], m + "experts.gate_up_proj": torch.stack(gate_up), m + "experts.down_proj": torch.stack(down)}
    hf = {m + "down_proj.weight": tl[t + "W_out"].T}
    if layout.fused:
        hf[m + "gate_up_proj.weight"] = torch.cat([tl[t + "W_gate"], tl[t + "W_in"]], dim=1).T
    else:
        hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"] = tl[t + "W_gate"].T, tl[t + "W_in"].T
    return hf


def tl_rounded_keys(layout: Layout, cfg: BridgeConfig) -> frozenset[str]:
    """Gemma's arithmetic TL keys: the scaled embedding and every (w + 1) norm weight."""
    keys = {"embed.W_E"} if layout.embed_scale else set()
    if layout.plus_one:
        keys.add("ln_final.w")
        for layer in range(cfg.n_layers):
            keys.update(f"blocks.{layer}.{slot.tl}.w" for slot in layout.norms)
            if cfg.use_qk_norm:
                keys.update({f"blocks.{layer}.attn.q_norm.w", f"blocks.{layer}.attn.k_norm.w"})
    return frozenset(keys)


def decoder_family(name: str, architecture: str, config_from_hf, layout: Layout = Layout()) -> Family:
    """A Family for one HF class of this layout."""
    return Family(
        name=name,
        hf_architectures=(architecture,),
        config_from_hf=config_from_hf,
        param_shapes=lambda cfg: param_shapes(layout, cfg),
        extra_param_shapes=lambda cfg: extra_param_shapes(layout, cfg),
        tied_aliases=tied_aliases(LM_HEAD, EMBED),
        embed_weights=lambda params, cfg: embed_weights(layout, params, cfg),
        layer_weights=lambda params, cfg, layer: layer_weights(layout, params, cfg, layer),
        unembed_weights=lambda params, cfg: unembed_weights(layout, params, cfg),
        tl_weights=lambda params, cfg: tl_weights(layout, params, cfg),
        hf_from_tl=lambda tl, cfg, extras=(): hf_from_tl(layout, tl, cfg, extras),
        tl_derived_keys=tl_derived_keys,
        tl_rounded_keys=lambda cfg: tl_rounded_keys(layout, cfg),
    )
