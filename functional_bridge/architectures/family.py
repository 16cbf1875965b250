"""What an HF model family is to the bridge: data plus small pure functions.

A family maps an HF config to a BridgeConfig, names and shapes the HF leaves, hands the forward
each layer's weights in their fastest layout (views of the leaves, never copies), and derives
TransformerLens's weights (and their inverse) from the leaves. Adding a family is one new file
that builds a Family, registered in ``architectures/__init__.py``.

Most families are causal LMs run by ``model.py``'s decoder stack. A family whose model is not
(BERT's post-LN masked-LM encoder) brings its own pure ``forward`` and ``hook_names`` and says
what it is in ``kind``; ``model.py`` and ``hooks.py`` dispatch to them, and the causal-LM-only
API (per_example_grads' default next-token loss, the residual decompositions) refuses other kinds
by name (``architectures.require_causal_lm``), as processing does where ``no_processing`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Collection, Mapping, NamedTuple

import torch
from torch import Tensor

from ..components.attention import AttentionWeights
from ..components.linear import Affine
from ..components.mlp import MLPWeights
from ..components.moe import MoEWeights
from ..components.norms import Norm
from ..config import BridgeConfig

Params = Mapping[str, Tensor]
Shapes = dict[str, tuple[int, ...]]

CAUSAL_LM, MASKED_LM = "causal_lm", "masked_lm"
# HookedTransformer's stacked global weights: short name -> TL key.
GLOBAL_TL_KEYS = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "W_U": "unembed.W_U", "b_U": "unembed.b_U"}


class EmbedWeights(NamedTuple):
    W_E: Tensor  # [d_vocab, d_embed] (d_embed is d_model unless project_in maps it there)
    W_pos: Tensor | None  # [n_ctx, d_model] learned positions, or None (rotary, ALiBi)
    scale: float | None = None  # token embeddings times this, in their dtype (Gemma: sqrt(d_model))
    ln: Norm | None = None  # a norm on the token embedding (BLOOM)
    project_in: Affine | None = None  # d_embed -> d_model, before positions are added (OPT)


class LayerWeights(NamedTuple):
    """One block's weights. Each norm present applies at its place: ln1/ln2 on the sublayer
    inputs, ln1_post/ln2_post on their outputs, ln1_resid/ln2_resid on the residual sums
    (post-LN). The hook names for them come from cfg.norm_placement."""

    ln1: Norm | None  # None: attention reads resid_pre itself (post-norm blocks)
    attn: AttentionWeights
    ln2: Norm | None  # None: the MLP reads ln1's output (parallel blocks) or resid_mid itself
    mlp: MLPWeights | MoEWeights
    ln1_post: Norm | None = None
    ln2_post: Norm | None = None
    ln1_resid: Norm | None = None
    ln2_resid: Norm | None = None


class UnembedWeights(NamedTuple):
    ln_final: Norm | None  # None: no final norm (cfg.final_norm False)
    unembed: Affine  # d_unembed -> d_vocab_out
    project_out: Affine | None = None  # d_model -> d_unembed, after the final norm (OPT)


@dataclass(frozen=True)
class Family:
    name: str  # HF's model_type ("gpt2", "llama", ...)
    hf_architectures: tuple[str, ...]  # HF class names this family loads
    config_from_hf: Callable[[object], BridgeConfig]
    param_shapes: Callable[[BridgeConfig], Shapes]  # HF leaves, in HF named_parameters() order
    # Leaves a family's HF layout lacks but processing may add (name -> shape); forward and
    # tl_weights read them when present. to_hf refuses those HF cannot hold.
    extra_param_shapes: Callable[[BridgeConfig], Shapes]
    # HF state_dict names that alias another leaf (GPT-2's tied lm_head.weight -> wte.weight).
    tied_aliases: Callable[[BridgeConfig], dict[str, str]]
    embed_weights: Callable[[Params, BridgeConfig], EmbedWeights]
    layer_weights: Callable[[Params, BridgeConfig, int], LayerWeights]
    unembed_weights: Callable[[Params, BridgeConfig], UnembedWeights]
    tl_weights: Callable[[Params, BridgeConfig], dict[str, Tensor]]
    # Inverse of tl_weights: new HF leaves (param_shapes order, then the requested extra leaves,
    # a subset of extra_param_shapes) from a complete TL dict. hf_from_tl(tl_weights(p)) == p
    # exactly. A tied unembedding is read from embed.W_E unless "lm_head.weight" is an extra.
    hf_from_tl: Callable[[Mapping[str, Tensor], BridgeConfig, Collection[str]], dict[str, Tensor]]
    # TL keys that are copies or expansions of another TL key (derived -> source): writes must go
    # to the source. E.g. grouped-query W_K -> _W_K; a tied unembed.W_U -> embed.W_E.
    tl_derived_keys: Callable[[BridgeConfig], dict[str, str]] = lambda cfg: {}
    # What the model is: CAUSAL_LM (next-token logits) or MASKED_LM (an encoder with an MLM head).
    kind: str = CAUSAL_LM
    # The family's own pure forward on checked inputs, when its model is not model.py's decoder
    # stack: (params, tokens, cfg, attention_mask, hooks, token_type_ids, n_blocks) -> logits, or
    # with n_blocks (an int: stop_at_layer's block count) the residual stream after that many blocks.
    forward: Callable[..., Tensor] | None = None
    # Its hook names in execution order (with forward); None: HookedTransformer's.
    hook_names: Callable[[BridgeConfig], tuple[str, ...]] | None = None
    # The stacked global weights (W_E, W_pos, W_U, b_U) under this family's TL keys.
    global_tl_keys: Mapping[str, str] = field(default_factory=lambda: GLOBAL_TL_KEYS)
    # The hook whose activation is the token embedding W_E[tokens] (per_example_grads replaces it).
    token_embed_hook: str = "hook_embed"
    # Why TransformerLens's weight processing does not apply (None: it does).
    no_processing: str | None = None
    # TL keys that are arithmetic on a leaf rather than a view of it, as TL's converter computes
    # them (Gemma: embed.W_E = W_E * sqrt(d_model), norm weights w + 1). Through these a round
    # trip (TL -> HF -> TL, or HF -> TL -> HF) is exact only to the rounding of that arithmetic:
    # within 2 eps (|value| + 1) in the leaves' dtype.
    tl_rounded_keys: Callable[[BridgeConfig], frozenset[str]] = lambda cfg: frozenset()


def new_leaves(from_tl: Mapping[str, Tensor], cfg: BridgeConfig, shapes: Shapes, extra_shapes: Shapes, extras: Collection[str]) -> dict[str, Tensor]:
    """The common end of every ``hf_from_tl``: from ``from_tl`` (HF name -> tensor in the HF
    layout, for every leaf and any extra the family can fill), the leaves in HF order (``shapes``)
    then the requested extras in the family's order, each a new contiguous tensor (never an
    input's own, so a caller may write the results into leaves the inputs view)."""
    unknown = [name for name in extras if name not in extra_shapes]
    if unknown:
        raise ValueError(f"{cfg.original_architecture} has no extra leaf {unknown}; known: {list(extra_shapes)}")
    names = [*shapes, *(name for name in extra_shapes if name in extras)]
    return {name: from_tl[name].clone(memory_format=torch.contiguous_format) for name in names}
