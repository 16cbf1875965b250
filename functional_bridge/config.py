"""BridgeConfig: the shape and math of a model, in TransformerLens's field names.

There is deliberately no dtype or device field: both are read off the parameter leaves, so
they cannot fall out of step with the tensors (a bug class of TransformerLens's bridge).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMALIZATION_TYPES = ("LN", "RMS")
POSITIONAL_EMBEDDING_TYPES = ("standard", "rotary", "alibi")
# Where a block's norms sit: "pre" (ln1/ln2 read the residual stream), "pre_post" (also ln1_post and
# ln2_post on the attention and MLP outputs: Gemma 2/3), "output" (only on the outputs, named ln1 and
# ln2 as TransformerLens names OLMo 2's), "post_residual" (ln1/ln2 normalise resid + output: OPT's
# do_layer_norm_before=False).
NORM_PLACEMENTS = ("pre", "pre_post", "output", "post_residual")


@dataclass(frozen=True)
class BridgeConfig:
    """Architecture hyperparameters. Frozen and hashable, so it can be a static argument."""

    original_architecture: str  # the HF class name, e.g. "GPT2LMHeadModel"
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    act_fn: str
    normalization_type: str = "LN"
    eps: float = 1e-5
    positional_embedding_type: str = "standard"
    n_key_value_heads: int | None = None  # None: as many key/value heads as query heads
    attn_scale: float = 1.0  # attention scores are divided by this (sqrt(d_head) usually)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide layer l's scores by l + 1
    rotary_dim: int | None = None  # leading dims of each head that are rotated (rotary only)
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False  # GPT-J pairs (0,1),(2,3)...; NeoX/Llama pair i, i+d/2
    rotary_scaling_factor: float = 1.0  # HF's "linear" rope scaling: frequencies / factor
    use_NTK_by_parts_rope: bool = False  # HF's "llama3" rope scaling, with the four fields below
    NTK_by_parts_factor: float = 8.0
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_original_ctx_len: int = 8192
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False
    use_qk_norm: bool = False
    qkv_bias: bool = True  # the HF layout has q/k/v projection biases (False: TL's are zeros)
    attn_out_bias: bool = True  # the HF layout has an attention output bias
    window_size: int | None = None  # sliding-window attention span, None for global
    attn_types: tuple[str, ...] | None = None  # per layer "global"/"local" (window); None: all local if window_size
    tie_word_embeddings: bool = True
    d_vocab_out: int | None = None  # defaults to d_vocab
    n_token_types: int = 0  # BERT's token-type (segment) embeddings, HF's type_vocab_size; 0: none
    # The second wave (Gemma, Phi, OLMo, Mixtral, GPT-Neo, OPT, BLOOM); TransformerLens's names
    # where it has the option. Each default leaves the math of the families above unchanged.
    rotary_base_local: float | None = None  # local (windowed) layers' rotary base, unscaled (Gemma 3)
    attn_scores_soft_cap: float | None = None  # scores -> cap * tanh(scores / cap), before the mask
    output_logits_soft_cap: float | None = None  # logits -> cap * tanh(logits / cap), after unembed.hook_out
    norm_placement: str = "pre"  # see NORM_PLACEMENTS
    qk_norm_over_heads: bool = False  # q/k norms span all heads' dims, before the head split (OLMo 2)
    clip_qkv: float | None = None  # q, k, v clamped to [-clip, clip] after their hooks (OLMo)
    post_embedding_ln: bool = False  # a LayerNorm on the token embedding (BLOOM)
    final_norm: bool = True  # a norm before the unembedding (OPT's post-LN models have none)
    norm_affine: bool = True  # the LayerNorms have weights and biases (False: OPT's layer_norm_elementwise_affine=False)
    word_embed_proj_dim: int | None = None  # OPT's embedding width when project_in/out map it to d_model; None: d_model
    residual_from_norm: bool = False  # the residual branch starts at the norm's output (BLOOM option)
    rotary_in_float32: bool = False  # 16-bit models rotate q/k in float32, cast after (OLMo's HF rotary)
    num_experts: int | None = None  # mixture-of-experts MLP (Mixtral): experts per layer
    experts_per_token: int | None = None  # ... and the top-k routed per token

    def __post_init__(self):
        if self.d_vocab_out is None:
            object.__setattr__(self, "d_vocab_out", self.d_vocab)
        if self.normalization_type not in NORMALIZATION_TYPES:
            raise ValueError(
                f"normalization_type must be one of {NORMALIZATION_TYPES}, "
                f"got {self.normalization_type!r}"
            )
        if self.positional_embedding_type not in POSITIONAL_EMBEDDING_TYPES:
            raise ValueError(
                f"positional_embedding_type must be one of {POSITIONAL_EMBEDDING_TYPES}, "
                f"got {self.positional_embedding_type!r}"
            )
        if self.norm_placement not in NORM_PLACEMENTS:
            raise ValueError(f"norm_placement must be one of {NORM_PLACEMENTS}, got {self.norm_placement!r}")
        if (self.num_experts is None) != (self.experts_per_token is None) or (
            self.num_experts is not None and not 0 < self.experts_per_token <= self.num_experts
        ):
            raise ValueError(
                f"num_experts and experts_per_token go together, with 0 < experts_per_token <= num_experts; "
                f"got {self.num_experts} and {self.experts_per_token}"
            )
        if self.attn_types is not None and (
            len(self.attn_types) != self.n_layers or set(self.attn_types) - {"global", "local"}
        ):
            raise ValueError(f"attn_types must give 'global' or 'local' for each of {self.n_layers} layers, got {self.attn_types}")
        if self.n_key_value_heads is not None and self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_key_value_heads "
                f"({self.n_key_value_heads})"
            )

    @property
    def n_kv_heads(self) -> int:
        """Number of key/value heads (n_heads unless the model uses grouped-query attention)."""
        return self.n_key_value_heads or self.n_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding-window span of a layer's attention, None for global attention."""
        if self.attn_types is not None and self.attn_types[layer] == "global":
            return None
        return self.window_size

    def layer_uses_local_rope(self, layer: int) -> bool:
        """Whether a layer rotates with rotary_base_local (a windowed layer of a model that has one)."""
        return self.rotary_base_local is not None and self.layer_window(layer) is not None

    def replace(self, **changes) -> "BridgeConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
