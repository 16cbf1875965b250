"""BERT (BertForMaskedLM, BertForPreTraining): a post-LN encoder with a masked-LM head.

Leaves are HF's nn.Linear / nn.LayerNorm / nn.Embedding tensors; the forward is
``encoder.masked_lm_logits`` (bidirectional attention, token types, absolute positions). The MLM
decoder is tied to the word embeddings (weight) and to ``cls.predictions.bias`` (bias), so
neither alias is a leaf.

TransformerLens's view is that of TL 3.9's ``convert_bert_weights``, which reads a
BertForPreTraining: for it every key matches (``pooler.*`` and ``nsp_head.*`` included: carried as
leaves and TL weights, never run, as HookedEncoder's forward does not run them). BertForMaskedLM
has no pooler and no NSP head, so its view lacks exactly those four keys.

Refused by name: ``is_decoder`` / ``add_cross_attention`` (a causal or cross-attending BERT),
``tie_word_embeddings=False`` (HF then keeps ``cls.predictions.bias`` as an unused leaf beside the
decoder's own bias, which TL's weights cannot hold), activations the components lack, and
weight processing (TL defines none for HookedEncoder: a LayerNorm after each sublayer writes the
residual stream itself, so there is no later weight to fold it into).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Collection, Mapping

import einops
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import ACTIVATIONS, MLPWeights
from ..config import BridgeConfig
from ..encoder import EncoderEmbedWeights, MaskedLMHeadWeights, encoder_hook_names, masked_lm_logits
from .family import MASKED_LM, EmbedWeights, Family, LayerWeights, Params, Shapes, UnembedWeights, new_leaves
from .leaves import layer_norm, linear

MASKED_LM_ARCH, PRETRAINING_ARCH = "BertForMaskedLM", "BertForPreTraining"
WORD, POSITION, TOKEN_TYPE = (f"bert.embeddings.{name}_embeddings.weight" for name in ("word", "position", "token_type"))
HEAD = "cls.predictions."
TIED = {HEAD + "decoder.weight": WORD, HEAD + "decoder.bias": HEAD + "bias"}


def config_from_hf(hf, architecture: str) -> BridgeConfig:
    for option in ("is_decoder", "add_cross_attention"):
        if getattr(hf, option, False):
            raise ValueError(f"BERT with {option}=True is not supported (only the bidirectional encoder is)")
    if not getattr(hf, "tie_word_embeddings", True):
        raise ValueError(
            "BERT with tie_word_embeddings=False is not supported: HF then keeps cls.predictions.bias as an "
            "unused parameter beside the decoder's own bias, which TransformerLens's weights cannot hold"
        )
    if hf.hidden_act not in ACTIVATIONS:
        raise ValueError(f"BERT hidden_act {hf.hidden_act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    if hf.hidden_size % hf.num_attention_heads:
        raise ValueError(f"hidden_size ({hf.hidden_size}) must be divisible by num_attention_heads ({hf.num_attention_heads})")
    if hf.type_vocab_size < 1:
        raise ValueError(f"BERT needs type_vocab_size >= 1 (token type 0 is the default), got {hf.type_vocab_size}")
    d_head = hf.hidden_size // hf.num_attention_heads
    return BridgeConfig(
        original_architecture=architecture,
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
        positional_embedding_type="standard",
        attn_scale=math.sqrt(d_head),
        n_token_types=hf.type_vocab_size,
    )


def _block(layer: int) -> str:
    return f"bert.encoder.layer.{layer}."


def _pretraining(cfg: BridgeConfig) -> bool:
    return cfg.original_architecture == PRETRAINING_ARCH


def param_shapes(cfg: BridgeConfig) -> Shapes:
    d, m = cfg.d_model, cfg.d_mlp
    shapes: Shapes = {WORD: (cfg.d_vocab, d), POSITION: (cfg.n_ctx, d), TOKEN_TYPE: (cfg.n_token_types, d)}
    shapes.update({"bert.embeddings.LayerNorm.weight": (d,), "bert.embeddings.LayerNorm.bias": (d,)})
    for layer in range(cfg.n_layers):
        p = _block(layer)
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes.update({f"{p}{name}.weight": (d, d), f"{p}{name}.bias": (d,)})
        shapes.update({
            p + "attention.output.LayerNorm.weight": (d,), p + "attention.output.LayerNorm.bias": (d,),
            p + "intermediate.dense.weight": (m, d), p + "intermediate.dense.bias": (m,),
            p + "output.dense.weight": (d, m), p + "output.dense.bias": (d,),
            p + "output.LayerNorm.weight": (d,), p + "output.LayerNorm.bias": (d,),
        })  # fmt: skip
    if _pretraining(cfg):
        shapes.update({"bert.pooler.dense.weight": (d, d), "bert.pooler.dense.bias": (d,)})
    shapes.update({
        HEAD + "bias": (cfg.d_vocab_out,), HEAD + "transform.dense.weight": (d, d), HEAD + "transform.dense.bias": (d,),
        HEAD + "transform.LayerNorm.weight": (d,), HEAD + "transform.LayerNorm.bias": (d,),
    })  # fmt: skip
    if _pretraining(cfg):
        shapes.update({"cls.seq_relationship.weight": (2, d), "cls.seq_relationship.bias": (2,)})
    return shapes


def embed_weights(params: Params, cfg: BridgeConfig) -> EmbedWeights:
    return EmbedWeights(params[WORD], params[POSITION])


def encoder_embed_weights(params: Params, cfg: BridgeConfig) -> EncoderEmbedWeights:
    return EncoderEmbedWeights(params[WORD], params[POSITION], params[TOKEN_TYPE], layer_norm(params, "bert.embeddings.LayerNorm"))


def layer_weights(params: Params, cfg: BridgeConfig, layer: int) -> LayerWeights:
    """ln1 follows the attention and ln2 the MLP (HookedEncoder's names for HF's two LayerNorms)."""
    p = _block(layer)
    attn = AttentionWeights(
        qkv=None, q=linear(params, p + "attention.self.query"), k=linear(params, p + "attention.self.key"),
        v=linear(params, p + "attention.self.value"), o=linear(params, p + "attention.output.dense"),
    )  # fmt: skip
    mlp = MLPWeights(w_in=linear(params, p + "intermediate.dense"), w_gate=None, w_out=linear(params, p + "output.dense"))
    return LayerWeights(layer_norm(params, p + "attention.output.LayerNorm"), attn, layer_norm(params, p + "output.LayerNorm"), mlp)


def unembed_weights(params: Params, cfg: BridgeConfig) -> UnembedWeights:
    """The MLM head's LayerNorm (the last norm before the unembedding) and the tied decoder."""
    return UnembedWeights(layer_norm(params, HEAD + "transform.LayerNorm"), Affine(params[WORD], params[HEAD + "bias"], in_out=False))


def head_weights(params: Params, cfg: BridgeConfig) -> MaskedLMHeadWeights:
    final = unembed_weights(params, cfg)
    return MaskedLMHeadWeights(linear(params, HEAD + "transform.dense"), final.ln_final, final.unembed)


def forward(params: Params, tokens: Tensor, cfg: BridgeConfig, attention_mask, hooks, token_type_ids, n_blocks: int | None = None) -> Tensor:
    """Family.forward: MLM logits [batch, pos, d_vocab_out] (BertForPreTraining: its prediction_logits),
    or with n_blocks the residual stream [batch, pos, d_model] leaving the first n_blocks blocks."""
    layers = partial(layer_weights, params, cfg)
    return masked_lm_logits(
        encoder_embed_weights(params, cfg), layers, head_weights(params, cfg), tokens, cfg, attention_mask, hooks, token_type_ids,
        n_blocks,
    )  # fmt: skip


def _heads(weight: Tensor, n: int) -> Tensor:
    """nn.Linear [n * d_head, d_model] -> TL's [n, d_model, d_head]."""
    return einops.rearrange(weight, "(i h) m -> i m h", i=n)


def tl_weights(params: Params, cfg: BridgeConfig) -> dict:
    """TransformerLens 3.9's convert_bert_weights (its key order), as views of the leaves."""
    n = cfg.n_heads
    tl = {
        "embed.embed.W_E": params[WORD],
        "embed.pos_embed.W_pos": params[POSITION],
        "embed.token_type_embed.W_token_type": params[TOKEN_TYPE],
        "embed.ln.w": params["bert.embeddings.LayerNorm.weight"],
        "embed.ln.b": params["bert.embeddings.LayerNorm.bias"],
    }
    for layer in range(cfg.n_layers):
        p, t = _block(layer) + "attention.", f"blocks.{layer}."
        for key, name in (("Q", "query"), ("K", "key"), ("V", "value")):
            tl[t + "attn.W_" + key] = _heads(params[p + f"self.{name}.weight"], n)  # [n_heads, d_model, d_head]
            tl[t + "attn.b_" + key] = params[p + f"self.{name}.bias"].view(n, cfg.d_head)
        tl[t + "attn.W_O"] = einops.rearrange(params[p + "output.dense.weight"], "m (i h) -> i h m", i=n)
        tl[t + "attn.b_O"] = params[p + "output.dense.bias"]
        tl[t + "ln1.w"] = params[p + "output.LayerNorm.weight"]
        tl[t + "ln1.b"] = params[p + "output.LayerNorm.bias"]
        p = _block(layer)
        tl[t + "mlp.W_in"] = params[p + "intermediate.dense.weight"].T  # [d_model, d_mlp]
        tl[t + "mlp.b_in"] = params[p + "intermediate.dense.bias"]
        tl[t + "mlp.W_out"] = params[p + "output.dense.weight"].T  # [d_mlp, d_model]
        tl[t + "mlp.b_out"] = params[p + "output.dense.bias"]
        tl[t + "ln2.w"] = params[p + "output.LayerNorm.weight"]
        tl[t + "ln2.b"] = params[p + "output.LayerNorm.bias"]
    if _pretraining(cfg):
        tl["pooler.W"] = params["bert.pooler.dense.weight"].T
        tl["pooler.b"] = params["bert.pooler.dense.bias"]
    tl["mlm_head.W"] = params[HEAD + "transform.dense.weight"].T
    tl["mlm_head.b"] = params[HEAD + "transform.dense.bias"]
    tl["mlm_head.ln.w"] = params[HEAD + "transform.LayerNorm.weight"]
    tl["mlm_head.ln.b"] = params[HEAD + "transform.LayerNorm.bias"]
    tl["unembed.W_U"] = params[WORD].T  # [d_model, d_vocab]: the tied decoder
    tl["unembed.b_U"] = params[HEAD + "bias"]
    if _pretraining(cfg):
        tl["nsp_head.W"] = params["cls.seq_relationship.weight"].T
        tl["nsp_head.b"] = params["cls.seq_relationship.bias"]
    return tl


def hf_from_tl(tl: Mapping[str, Tensor], cfg: BridgeConfig, extras: Collection[str] = ()) -> dict:
    """Inverse of tl_weights: new HF leaves from a complete TL dict (unembed.W_U, the tied
    decoder, is read from embed.embed.W_E)."""
    hf = {
        WORD: tl["embed.embed.W_E"], POSITION: tl["embed.pos_embed.W_pos"], TOKEN_TYPE: tl["embed.token_type_embed.W_token_type"],
        "bert.embeddings.LayerNorm.weight": tl["embed.ln.w"], "bert.embeddings.LayerNorm.bias": tl["embed.ln.b"],
    }  # fmt: skip
    for layer in range(cfg.n_layers):
        p, t = _block(layer), f"blocks.{layer}."
        for key, name in (("Q", "query"), ("K", "key"), ("V", "value")):
            hf[p + f"attention.self.{name}.weight"] = einops.rearrange(tl[t + "attn.W_" + key], "i m h -> (i h) m")
            hf[p + f"attention.self.{name}.bias"] = tl[t + "attn.b_" + key].reshape(-1)
        hf[p + "attention.output.dense.weight"] = einops.rearrange(tl[t + "attn.W_O"], "i h m -> m (i h)")
        hf[p + "attention.output.dense.bias"] = tl[t + "attn.b_O"]
        hf[p + "attention.output.LayerNorm.weight"] = tl[t + "ln1.w"]
        hf[p + "attention.output.LayerNorm.bias"] = tl[t + "ln1.b"]
        hf[p + "intermediate.dense.weight"] = tl[t + "mlp.W_in"].T
        hf[p + "intermediate.dense.bias"] = tl[t + "mlp.b_in"]
        hf[p + "output.dense.weight"] = tl[t + "mlp.W_out"].T
        hf[p + "output.dense.bias"] = tl[t + "mlp.b_out"]
        hf[p + "output.LayerNorm.weight"] = tl[t + "ln2.w"]
        hf[p + "output.LayerNorm.bias"] = tl[t + "ln2.b"]
    if _pretraining(cfg):
        hf["bert.pooler.dense.weight"] = tl["pooler.W"].T
        hf["bert.pooler.dense.bias"] = tl["pooler.b"]
        hf["cls.seq_relationship.weight"] = tl["nsp_head.W"].T
        hf["cls.seq_relationship.bias"] = tl["nsp_head.b"]
    hf[HEAD + "bias"] = tl["unembed.b_U"]
    hf[HEAD + "transform.dense.weight"] = tl["mlm_head.W"].T
    hf[HEAD + "transform.dense.bias"] = tl["mlm_head.b"]
    hf[HEAD + "transform.LayerNorm.weight"] = tl["mlm_head.ln.w"]
    hf[HEAD + "transform.LayerNorm.bias"] = tl["mlm_head.ln.b"]
    return new_leaves(hf, cfg, param_shapes(cfg), {}, extras)


def _family(architecture: str) -> Family:
    return Family(
        name="bert",
        hf_architectures=(architecture,),
        config_from_hf=partial(config_from_hf, architecture=architecture),
        param_shapes=param_shapes,
        extra_param_shapes=lambda cfg: {},
        tied_aliases=lambda cfg: dict(TIED),
        embed_weights=embed_weights,
        layer_weights=layer_weights,
        unembed_weights=unembed_weights,
        tl_weights=tl_weights,
        hf_from_tl=hf_from_tl,
        tl_derived_keys=lambda cfg: {"unembed.W_U": "embed.embed.W_E"},
        kind=MASKED_LM,
        forward=forward,
        hook_names=encoder_hook_names,
        global_tl_keys={"W_E": "embed.embed.W_E", "W_pos": "embed.pos_embed.W_pos", "W_U": "unembed.W_U", "b_U": "unembed.b_U"},
        token_embed_hook="embed.hook_embed",
        no_processing=(
            "TransformerLens 3.9 defines no weight processing for HookedEncoder: BERT's LayerNorms follow "
            "each sublayer and write the residual stream themselves, so there is no later weight to fold them into"
        ),
    )


FOR_MASKED_LM = _family(MASKED_LM_ARCH)
FOR_PRETRAINING = _family(PRETRAINING_ARCH)
