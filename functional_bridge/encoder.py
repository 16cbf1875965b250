"""The pure post-LN encoder with a masked-LM head (BERT), with HookedEncoder's hook points.

``masked_lm_logits`` maps tokens [batch, pos] (with token types and a padding mask) to MLM logits
[batch, pos, d_vocab_out], as HF's BertForMaskedLM computes them:

    x = LN_embed(W_E[tokens] + W_token_type[token_types] + W_pos[positions])
    per block: x = LN1(x + attn(x)); x = LN2(x + mlp(x))      (LayerNorms after each sublayer)
    logits = LN_head(act(x @ W + b)) @ W_U + b_U

Attention is bidirectional: every query attends to every real (unpadded) key. Positions are
absolute, 0..pos-1 with padding counted, as HF counts them for an encoder: a right-padded row's
real tokens see what they see alone, a left-padded row's are shifted (the causal families' rule
"positions count real tokens" is not an encoder's). Token types default to 0.

Hook names, order and shapes are TransformerLens 3.9's HookedEncoder (which names its post-LN
block's norms ln1 and ln2 too): ``embed.hook_embed``, ``embed.hook_pos_embed`` and
``embed.hook_token_type_embed`` ([batch, pos, d_model] each), ``embed.ln.hook_scale`` /
``hook_normalized``, ``hook_full_embed``; per block ``hook_resid_pre``, the attention hooks,
``hook_attn_out``, ``hook_resid_mid`` (resid_pre + attn_out), ``ln1.*``, ``mlp.*``, ``hook_mlp_out``,
``hook_resid_post`` (ln1's output + mlp_out), ``ln2.*``, ``hook_normalized_resid_post`` (the
block's output); then ``mlm_head.ln.*``, ``unembed.hook_in``, ``unembed.hook_out``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Callable, NamedTuple

from torch import Tensor

from .components.attention import (
    AttentionMask,
    attend,
    attention_output,
    build_bidirectional_mask,
    inside_functorch_transform,
    project_qkv,
)
from .components.embed import embed_tokens
from .components.linear import Affine, affine
from .components.mlp import ACTIVATIONS, mlp
from .components.norms import Norm, apply_norm
from .config import BridgeConfig
from .hooks import HookSet, _memoized

if TYPE_CHECKING:  # the families import this module
    from .architectures.family import LayerWeights


class EncoderEmbedWeights(NamedTuple):
    W_E: Tensor  # [d_vocab, d_model]
    W_pos: Tensor  # [n_ctx, d_model]
    W_token_type: Tensor  # [n_token_types, d_model]
    ln: Norm


class MaskedLMHeadWeights(NamedTuple):
    transform: Affine  # d_model -> d_model, then cfg.act_fn
    ln: Norm
    unembed: Affine  # d_model -> d_vocab_out


@dataclass(frozen=True)
class EncoderLayerHookNames:
    """The hook point names of encoder block ``i``, in execution order."""

    resid_pre: str
    q: str
    k: str
    v: str
    attn_scores: str
    pattern: str
    z: str
    attn_out: str
    resid_mid: str
    ln1_scale: str
    ln1_normalized: str
    mlp_pre: str
    mlp_pre_linear: str | None  # (a gated MLP's; BERT has none)
    mlp_post: str
    mlp_out: str
    resid_post: str
    ln2_scale: str
    ln2_normalized: str
    normalized_resid_post: str

    def in_order(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self) if getattr(self, f.name)]


@_memoized
def encoder_layer_hook_names(layer: int) -> EncoderLayerHookNames:
    p = f"blocks.{layer}."
    return EncoderLayerHookNames(
        resid_pre=p + "hook_resid_pre", q=p + "attn.hook_q", k=p + "attn.hook_k", v=p + "attn.hook_v",
        attn_scores=p + "attn.hook_attn_scores", pattern=p + "attn.hook_pattern", z=p + "attn.hook_z",
        attn_out=p + "hook_attn_out", resid_mid=p + "hook_resid_mid",
        ln1_scale=p + "ln1.hook_scale", ln1_normalized=p + "ln1.hook_normalized",
        mlp_pre=p + "mlp.hook_pre", mlp_pre_linear=None, mlp_post=p + "mlp.hook_post", mlp_out=p + "hook_mlp_out",
        resid_post=p + "hook_resid_post", ln2_scale=p + "ln2.hook_scale", ln2_normalized=p + "ln2.hook_normalized",
        normalized_resid_post=p + "hook_normalized_resid_post",
    )  # fmt: skip


EMBED_HOOKS = ("embed.hook_embed", "embed.hook_pos_embed", "embed.hook_token_type_embed")
HEAD_HOOKS = ("mlm_head.ln.hook_scale", "mlm_head.ln.hook_normalized", "unembed.hook_in", "unembed.hook_out")


def encoder_hook_names(cfg: BridgeConfig) -> tuple[str, ...]:
    """HookedEncoder's hook points for this config, in execution order."""
    names = [*EMBED_HOOKS, "embed.ln.hook_scale", "embed.ln.hook_normalized", "hook_full_embed"]
    for layer in range(cfg.n_layers):
        names += encoder_layer_hook_names(layer).in_order()
    return (*names, *HEAD_HOOKS)


def masked_lm_logits(
    embed: EncoderEmbedWeights,
    layer_weights: Callable[[int], LayerWeights],
    head: MaskedLMHeadWeights,
    tokens: Tensor,
    cfg: BridgeConfig,
    attention_mask: Tensor | None,
    hooks: HookSet,
    token_type_ids: Tensor | None,
    n_blocks: int | None = None,
) -> Tensor:
    """Checked inputs (tokens, token types and mask [batch, pos]) -> logits [batch, pos, d_vocab_out].
    n_blocks: stop after that many blocks and return the residual stream [batch, pos, d_model]
    (HF's hidden_states[n_blocks]; HookedTransformer's stop_at_layer, which HookedEncoder lacks)."""
    in_transform = inside_functorch_transform(tokens, attention_mask, token_type_ids)
    mask = build_bidirectional_mask(tokens.shape[1], attention_mask, tokens.device, in_transform)
    resid = _embed(embed, tokens, token_type_ids, cfg, hooks)  # [batch, pos, d_model]
    for layer in range(cfg.n_layers if n_blocks is None else n_blocks):
        resid = _block(resid, layer_weights(layer), cfg, mask, hooks, encoder_layer_hook_names(layer))
    if n_blocks is not None:
        return resid
    x = ACTIVATIONS[cfg.act_fn](affine(resid, head.transform))
    x = apply_norm(x, head.ln, cfg.eps, hooks, "mlm_head.ln.hook_scale", "mlm_head.ln.hook_normalized")
    x = hooks("unembed.hook_in", x)
    return hooks("unembed.hook_out", affine(x, head.unembed))


def _embed(w: EncoderEmbedWeights, tokens: Tensor, token_type_ids: Tensor | None, cfg: BridgeConfig, hooks: HookSet) -> Tensor:
    """LN(word + token type + position), summed in HF's order; the position and token-type terms
    are materialised per row only when a hook asks for them (TL's hooks see [batch, pos, d_model])."""
    batch, seq = tokens.shape
    shape = (batch, seq, w.W_E.shape[-1])
    x = hooks("embed.hook_embed", embed_tokens(tokens, w.W_E))  # [batch, pos, d_model]
    positions = w.W_pos[:seq]  # [pos, d_model], a view of the leaf
    if hooks.wants("embed.hook_pos_embed"):  # a copy: an in-place edit in a hook must not reach the leaf
        positions = hooks("embed.hook_pos_embed", positions.expand(shape).clone())
    if token_type_ids is not None:
        types = embed_tokens(token_type_ids, w.W_token_type)  # [batch, pos, d_model]
    else:
        types = w.W_token_type[0]  # [d_model], a view of the leaf
        if hooks.wants("embed.hook_token_type_embed"):
            types = types.expand(shape).clone()
    types = hooks("embed.hook_token_type_embed", types)
    x = (x + types) + positions
    x = apply_norm(x, w.ln, cfg.eps, hooks, "embed.ln.hook_scale", "embed.ln.hook_normalized")
    return hooks("hook_full_embed", x)


def _block(
    resid: Tensor, w: LayerWeights, cfg: BridgeConfig, mask: AttentionMask, hooks: HookSet, names: EncoderLayerHookNames
) -> Tensor:
    """One post-LN block: resid [batch, pos, d_model] -> the normalised [batch, pos, d_model]."""
    resid = hooks(names.resid_pre, resid)
    q, k, v = project_qkv(resid, w.attn, cfg.n_heads, cfg.n_kv_heads, cfg.d_head)  # [batch, pos, head, d_head]
    q, k, v = hooks(names.q, q), hooks(names.k, k), hooks(names.v, v)
    z = attend(q, k, v, mask, cfg.attn_scale, hooks, names)
    attn_out = hooks(names.attn_out, attention_output(z, w.attn.o))
    resid = hooks(names.resid_mid, resid + attn_out)
    x = apply_norm(resid, w.ln1, cfg.eps, hooks, names.ln1_scale, names.ln1_normalized)
    mlp_out = hooks(names.mlp_out, mlp(x, w.mlp, cfg.act_fn, hooks, names))
    resid = hooks(names.resid_post, x + mlp_out)
    x = apply_norm(resid, w.ln2, cfg.eps, hooks, names.ln2_scale, names.ln2_normalized)
    return hooks(names.normalized_resid_post, x)
