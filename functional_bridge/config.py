"""BridgeConfig: the shape and math of a model, in TransformerLens's field names.

There is deliberately no dtype or device field: both are read off the parameter leaves, so
they cannot fall out of step with the tensors (a bug class of TransformerLens's bridge).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

NORMALIZATION_TYPES = ("LN", "RMS")
POSITIONAL_EMBEDDING_TYPES = ("standard", "rotary")


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

    def replace(self, **changes) -> "BridgeConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
