"""Hypothesis strategies for random small models of every supported HF family, and random
token batches and paddings for them.

``model_cases(architecture)`` draws a ``ModelCase``: an HF config's fields (layers, grouped-query
heads, head_dim, rotary type and scaling, partial rotary, sliding windows, tied or untied
embeddings, biases, parallel blocks, activations, eps) plus a weight seed and a query/key
sharpening. A new family adds one ``_<family>_fields`` strategy to ``FIELDS`` (the property tests
fail for a supported architecture without one). Sizes stay tiny (d_model <= 64, <= 3 layers) so a
model builds and runs in milliseconds; sequences stay under ``MAX_POS`` (every context length
drawn is at least that).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers
from hypothesis import strategies as st

from bert_helpers import perturb_bert_
from family_helpers import perturb_family_
from helpers import padded_batch, perturb_, random_tokens

MAX_POS = 16  # longest token sequence the tests draw; every n_ctx drawn is >= this
VOCAB = st.integers(11, 64)
LAYERS = st.integers(1, 3)
EPS = st.sampled_from([1e-6, 1e-5, 1e-3, 1e-1])
# every name both HF's ACT2FN and the bridge's ACTIVATIONS know
ACTIVATION = st.sampled_from(["gelu_new", "gelu_fast", "gelu_pytorch_tanh", "gelu", "relu", "silu", "swish", "quick_gelu"])
ROPE_THETA = st.sampled_from([10.0, 500.0, 10000.0, 500000.0])
N_CTX = st.sampled_from([MAX_POS, 32, 64])


@dataclass(frozen=True)
class ModelCase:
    """One drawn model: HF config fields for ``architecture``, a weight seed and qk_scale (the
    factor applied to query and key projections so attention is sharp, not near-uniform)."""

    architecture: str
    fields: dict = field(hash=False)
    seed: int = 0
    qk_scale: float = 1.0

    def config(self):
        config_class = getattr(transformers, CONFIG_CLASSES[self.architecture])
        fields = copy.deepcopy({"bos_token_id": 0, "eos_token_id": 0, **self.fields})  # HF edits rope_parameters in place
        return config_class(**fields)

    def build(self) -> torch.nn.Module:
        """The HF model in eval mode, eager attention, norms and biases moved off their init
        values and queries/keys scaled by qk_scale (tests/helpers.py, tests/family_helpers.py)."""
        torch.manual_seed(self.seed)
        model = getattr(transformers, self.architecture)(self.config()).eval()
        model.set_attn_implementation("eager")
        if getattr(model.config, "_experts_implementation", None) not in (None, "eager"):
            model.set_experts_implementation("eager")  # HF's grouped_mm needs 16-byte strides the drawn sizes lack
        if self.architecture == "GPT2LMHeadModel":
            return perturb_(model, self.seed, self.qk_scale)
        if self.architecture.startswith("Bert"):
            return perturb_bert_(model, self.seed, self.qk_scale)
        return perturb_family_(model, self.seed, self.qk_scale)

    @property
    def activation(self) -> str:
        if self.architecture == "BloomForCausalLM":  # no option: HF's BloomGelu, the tanh approximation
            return "gelu_fast"
        return self.fields.get("hidden_act", self.fields.get("activation_function", self.fields.get("hidden_activation")))


# family field strategies ----------------------------------------------------------------------


def _even_up_to(n: int):
    return st.integers(1, n // 2).map(lambda k: 2 * k)


@st.composite
def _gpt2_fields(draw) -> dict:
    n_head, d_head = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12, 16]))
    return dict(
        vocab_size=draw(VOCAB), n_positions=draw(N_CTX), n_layer=draw(LAYERS), n_head=n_head, n_embd=n_head * d_head,
        n_inner=draw(st.none() | st.integers(8, 96)), activation_function=draw(ACTIVATION),
        layer_norm_epsilon=draw(EPS), tie_word_embeddings=draw(st.booleans()),
        scale_attn_weights=draw(st.booleans()), scale_attn_by_inverse_layer_idx=draw(st.booleans()),
        reorder_and_upcast_attn=draw(st.booleans()),
    )  # fmt: skip


@st.composite
def _rope_parameters(draw, partial: bool = False) -> dict:
    """rope_type default, linear (factor) or llama3 (NTK-by-parts); partial: a
    partial_rotary_factor too (GPT-NeoX)."""
    rope = {"rope_type": draw(st.sampled_from(["default", "linear", "llama3"])), "rope_theta": draw(ROPE_THETA)}
    if rope["rope_type"] == "linear":
        rope["factor"] = draw(st.sampled_from([0.5, 2.0, 3.0, 8.0]))
    elif rope["rope_type"] == "llama3":
        low = draw(st.sampled_from([0.5, 1.0, 2.0]))
        rope.update(factor=draw(st.sampled_from([2.0, 8.0, 32.0])), low_freq_factor=low,
                    high_freq_factor=low * draw(st.sampled_from([2.0, 4.0])),
                    original_max_position_embeddings=draw(st.sampled_from([4, 8, 16])))  # fmt: skip
    if partial:
        rope["partial_rotary_factor"] = draw(st.sampled_from([0.25, 0.5, 0.75, 1.0]))
    return rope


@st.composite
def _gqa_heads(draw) -> dict:
    """num_key_value_heads and a group size (1: multi-head) and an explicit head_dim that need not
    be hidden_size / num_attention_heads."""
    n_kv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return dict(num_attention_heads=n_kv * group, num_key_value_heads=n_kv, head_dim=draw(st.sampled_from([4, 6, 8, 12, 16])))


def _window_layer_types(draw, n_layers: int) -> dict:
    """Qwen2/Qwen3 sliding windows: off, on from max_window_layers, or per-layer layer_types."""
    mode = draw(st.sampled_from(["off", "max_window_layers", "layer_types"]))
    if mode == "off":
        return dict(use_sliding_window=False)
    window = dict(use_sliding_window=True, sliding_window=draw(st.integers(1, 8)))
    if mode == "max_window_layers":
        return dict(window, max_window_layers=draw(st.integers(0, n_layers)))
    types = st.sampled_from(["sliding_attention", "full_attention"])
    return dict(window, layer_types=draw(st.lists(types, min_size=n_layers, max_size=n_layers)))


def _llama_like_fields(family: str):
    @st.composite
    def fields(draw) -> dict:
        n_layers, heads = draw(LAYERS), draw(_gqa_heads())
        # LlamaConfig requires hidden_size % num_attention_heads == 0 (head_dim stays free)
        hidden = heads["num_attention_heads"] * draw(st.sampled_from([2, 4, 8])) if family == "llama" else draw(st.sampled_from([16, 24, 32, 48]))
        out = dict(
            vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=n_layers,
            hidden_size=hidden, intermediate_size=draw(st.integers(8, 96)), hidden_act=draw(ACTIVATION),
            rms_norm_eps=draw(EPS), tie_word_embeddings=draw(st.booleans()), rope_parameters=draw(_rope_parameters()),
            **heads,
        )  # fmt: skip
        if family in ("llama", "qwen3"):
            out["attention_bias"] = draw(st.booleans())
        if family == "mistral":
            out["sliding_window"] = draw(st.none() | st.integers(1, 8))
        if family in ("qwen2", "qwen3"):
            out.update(_window_layer_types(draw, n_layers))
        return out

    return fields()


@st.composite
def _neox_fields(draw) -> dict:
    n_heads, d_head = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12, 16]))
    rope = draw(_rope_parameters(partial=True).filter(lambda r: int(d_head * r["partial_rotary_factor"]) % 2 == 0))
    return dict(
        vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=draw(LAYERS),
        num_attention_heads=n_heads, hidden_size=n_heads * d_head, intermediate_size=draw(st.integers(8, 96)),
        hidden_act=draw(ACTIVATION), layer_norm_eps=draw(EPS), tie_word_embeddings=draw(st.booleans()),
        use_parallel_residual=draw(st.booleans()), attention_bias=draw(st.booleans()), rope_parameters=rope,
    )  # fmt: skip


@st.composite
def _gptj_fields(draw) -> dict:
    n_head, d_head = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12, 16]))
    return dict(
        vocab_size=draw(VOCAB), n_positions=draw(N_CTX), n_layer=draw(LAYERS), n_head=n_head, n_embd=n_head * d_head,
        rotary_dim=draw(_even_up_to(d_head)), n_inner=draw(st.none() | st.integers(8, 96)),
        activation_function=draw(ACTIVATION), layer_norm_epsilon=draw(EPS), tie_word_embeddings=draw(st.booleans()),
    )  # fmt: skip


@st.composite
def _bert_fields(draw) -> dict:
    """BERT: 1-3 token types; the decoder stays tied (an untied one is refused by name)."""
    n_heads, d_head = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12, 16]))
    return dict(
        vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=draw(LAYERS),
        num_attention_heads=n_heads, hidden_size=n_heads * d_head, intermediate_size=draw(st.integers(8, 96)),
        hidden_act=draw(ACTIVATION), layer_norm_eps=draw(EPS), type_vocab_size=draw(st.integers(1, 3)),
    )  # fmt: skip


def _rope(draw, d_head: int, partial: bool) -> dict:
    """_rope_parameters whose rotary dims (partial: a drawn fraction of d_head) are even."""
    return draw(_rope_parameters(partial=partial).filter(lambda r: int(d_head * r.get("partial_rotary_factor", 1.0)) % 2 == 0))


def _layer_types(draw, n_layers: int) -> list[str]:
    return draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n_layers, max_size=n_layers))


def _gemma_fields(generation: int):
    """Gemma 1/2/3: d_model a perfect square (sqrt(d_model), the embedding scale, exact in every
    dtype, so HF's float64 reference scales as its float32 model does); Gemma 2/3's windows per
    layer type, query_pre_attn_scalar, soft caps that bind; Gemma 3's local and global rope."""

    @st.composite
    def fields(draw) -> dict:
        n_layers, heads = draw(LAYERS), draw(_gqa_heads())
        out = dict(
            vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=n_layers,
            hidden_size=draw(st.sampled_from([h for h in (16, 36, 64) if h % heads["num_attention_heads"] == 0])),  # HF: a multiple of the heads
            intermediate_size=draw(st.integers(8, 96)),
            rms_norm_eps=draw(EPS), tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()), **heads,
        )  # fmt: skip
        out["hidden_act" if generation == 1 else "hidden_activation"] = draw(ACTIVATION)
        if generation == 3:
            local = {"rope_type": "default", "rope_theta": draw(ROPE_THETA)}
            out["rope_parameters"] = {"full_attention": draw(_rope_parameters()), "sliding_attention": local}
        else:
            out["rope_parameters"] = draw(_rope_parameters())
        if generation > 1:
            out.update(sliding_window=draw(st.integers(1, 8)), layer_types=_layer_types(draw, n_layers),
                       query_pre_attn_scalar=draw(st.sampled_from([4, 16, 20, 64])),
                       final_logit_softcapping=draw(st.none() | st.sampled_from([2.0, 5.0, 30.0])))  # fmt: skip
        if generation == 2:
            out["attn_logit_softcapping"] = draw(st.none() | st.sampled_from([2.0, 10.0, 50.0]))
        return out

    return fields()


@st.composite
def _phi_fields(draw) -> dict:
    heads, d_head = draw(_gqa_heads()), draw(st.sampled_from([4, 8, 12, 16]))
    n_heads = heads["num_attention_heads"]
    return dict(
        vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=draw(LAYERS),
        num_attention_heads=n_heads, num_key_value_heads=heads["num_key_value_heads"], hidden_size=n_heads * d_head,
        intermediate_size=draw(st.integers(8, 96)), hidden_act=draw(ACTIVATION), layer_norm_eps=draw(EPS),
        tie_word_embeddings=draw(st.booleans()), qk_layernorm=draw(st.booleans()), rope_parameters=_rope(draw, d_head, True),
    )  # fmt: skip


@st.composite
def _phi3_fields(draw) -> dict:
    heads, d_head = draw(_gqa_heads()), draw(st.sampled_from([4, 8, 12, 16]))
    n_heads = heads["num_attention_heads"]
    return dict(
        vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=draw(LAYERS), pad_token_id=0,
        num_attention_heads=n_heads, num_key_value_heads=heads["num_key_value_heads"], hidden_size=n_heads * d_head,
        intermediate_size=draw(st.integers(8, 96)), hidden_act=draw(ACTIVATION), rms_norm_eps=draw(EPS),
        tie_word_embeddings=draw(st.booleans()), sliding_window=draw(st.none() | st.integers(1, 8)),
        rope_parameters=draw(st.builds(  # Phi3Config accepts rope types default and longrope (refused) only
            lambda theta, factor: {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor},
            ROPE_THETA, st.sampled_from([f for f in (0.25, 0.5, 0.75, 1.0) if int(d_head * f) % 2 == 0]))),
    )  # fmt: skip


def _olmo_fields(olmo2: bool):
    @st.composite
    def fields(draw) -> dict:
        heads, d_head = draw(_gqa_heads()), draw(st.sampled_from([4, 8, 12, 16]))
        n_heads = heads["num_attention_heads"]
        out = dict(
            vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=draw(LAYERS), pad_token_id=0,
            num_attention_heads=n_heads, num_key_value_heads=heads["num_key_value_heads"], hidden_size=n_heads * d_head,
            intermediate_size=draw(st.integers(8, 96)), hidden_act=draw(ACTIVATION), tie_word_embeddings=draw(st.booleans()),
            attention_bias=draw(st.booleans()), rope_parameters=_rope(draw, d_head, False),
        )  # fmt: skip
        if olmo2:
            out["rms_norm_eps"] = draw(EPS)
        else:
            out["clip_qkv"] = draw(st.none() | st.sampled_from([0.5, 1.5, 8.0]))
        return out

    return fields()


@st.composite
def _mixtral_fields(draw) -> dict:
    experts = draw(st.integers(1, 4))
    out = draw(_llama_like_fields("mistral"))
    return dict(out, num_local_experts=experts, num_experts_per_tok=draw(st.integers(1, experts)))


@st.composite
def _gpt_neo_fields(draw) -> dict:
    """GPT-Neo: each layer global or local, windows that bind at MAX_POS."""
    n_heads, d_head, n_layers = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12, 16])), draw(LAYERS)
    types = draw(st.lists(st.sampled_from(["global", "local"]), min_size=n_layers, max_size=n_layers))
    return dict(
        vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_layers=n_layers, num_heads=n_heads,
        hidden_size=n_heads * d_head, intermediate_size=draw(st.none() | st.integers(8, 96)),
        activation_function=draw(ACTIVATION), layer_norm_epsilon=draw(EPS), tie_word_embeddings=draw(st.booleans()),
        attention_types=[[[t], 1] for t in types], window_size=draw(st.integers(1, 8)),
    )  # fmt: skip


@st.composite
def _opt_fields(draw) -> dict:
    """OPT: pre- or post-LN blocks, an embedding width projected to d_model or not, biases or
    none, LayerNorms with or without weights."""
    n_heads, d_head = draw(st.integers(1, 4)), draw(st.sampled_from([4, 8, 12, 16]))
    return dict(
        vocab_size=draw(VOCAB), max_position_embeddings=draw(N_CTX), num_hidden_layers=draw(LAYERS),
        num_attention_heads=n_heads, hidden_size=n_heads * d_head, ffn_dim=draw(st.integers(8, 96)),
        activation_function=draw(ACTIVATION), do_layer_norm_before=draw(st.booleans()),
        word_embed_proj_dim=draw(st.none() | st.integers(4, 40)), enable_bias=draw(st.booleans()),
        layer_norm_elementwise_affine=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()),
    )  # fmt: skip


@st.composite
def _bloom_fields(draw) -> dict:
    """BLOOM: head counts that are and are not powers of two (HF's two slope sequences), the
    residual from the norm's output or not; pretraining_tp (which alone changes nothing) and
    slow_but_exact, not both (refused: tests/test_families.py)."""
    n_heads, d_head = draw(st.integers(1, 6)), draw(st.sampled_from([4, 8, 12, 16]))
    return dict(
        vocab_size=draw(VOCAB), n_layer=draw(LAYERS), n_head=n_heads, hidden_size=n_heads * d_head,
        layer_norm_epsilon=draw(EPS), apply_residual_connection_post_layernorm=draw(st.booleans()),
        **draw(st.sampled_from([dict(pretraining_tp=2), dict(slow_but_exact=True), {}])),
        tie_word_embeddings=draw(st.booleans()),
    )  # fmt: skip


# HF class -> its config class, and the strategy for its config fields
CONFIG_CLASSES = {
    "GPT2LMHeadModel": "GPT2Config",
    "LlamaForCausalLM": "LlamaConfig",
    "MistralForCausalLM": "MistralConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
    "GPTNeoXForCausalLM": "GPTNeoXConfig",
    "GPTJForCausalLM": "GPTJConfig",
    "BertForMaskedLM": "BertConfig",
    "BertForPreTraining": "BertConfig",
    "GemmaForCausalLM": "GemmaConfig",
    "Gemma2ForCausalLM": "Gemma2Config",
    "Gemma3ForCausalLM": "Gemma3TextConfig",
    "PhiForCausalLM": "PhiConfig",
    "Phi3ForCausalLM": "Phi3Config",
    "OlmoForCausalLM": "OlmoConfig",
    "Olmo2ForCausalLM": "Olmo2Config",
    "MixtralForCausalLM": "MixtralConfig",
    "GPTNeoForCausalLM": "GPTNeoConfig",
    "OPTForCausalLM": "OPTConfig",
    "BloomForCausalLM": "BloomConfig",
}
FIELDS: dict[str, Callable[[], st.SearchStrategy[dict]]] = {
    "GPT2LMHeadModel": _gpt2_fields,
    "LlamaForCausalLM": lambda: _llama_like_fields("llama"),
    "MistralForCausalLM": lambda: _llama_like_fields("mistral"),
    "Qwen2ForCausalLM": lambda: _llama_like_fields("qwen2"),
    "Qwen3ForCausalLM": lambda: _llama_like_fields("qwen3"),
    "GPTNeoXForCausalLM": _neox_fields,
    "GPTJForCausalLM": _gptj_fields,
    "BertForMaskedLM": _bert_fields,
    "BertForPreTraining": _bert_fields,
    "GemmaForCausalLM": lambda: _gemma_fields(1),
    "Gemma2ForCausalLM": lambda: _gemma_fields(2),
    "Gemma3ForCausalLM": lambda: _gemma_fields(3),
    "PhiForCausalLM": _phi_fields,
    "Phi3ForCausalLM": _phi3_fields,
    "OlmoForCausalLM": lambda: _olmo_fields(False),
    "Olmo2ForCausalLM": lambda: _olmo_fields(True),
    "MixtralForCausalLM": _mixtral_fields,
    "GPTNeoForCausalLM": _gpt_neo_fields,
    "OPTForCausalLM": _opt_fields,
    "BloomForCausalLM": _bloom_fields,
}


def model_cases(architecture: str) -> st.SearchStrategy[ModelCase]:
    return st.builds(
        ModelCase,
        architecture=st.just(architecture),
        fields=FIELDS[architecture](),
        seed=st.integers(0, 2**16),
        qk_scale=st.sampled_from([1.0, 4.0, 8.0]),
    )


# inputs ---------------------------------------------------------------------------------------


@st.composite
def token_batches(draw, vocab: int, max_batch: int = 3) -> torch.Tensor:
    """Random tokens [batch, pos], pos <= MAX_POS, from a drawn seed."""
    batch, pos = draw(st.integers(1, max_batch)), draw(st.integers(1, MAX_POS))
    return random_tokens(batch, pos, vocab, seed=draw(st.integers(0, 2**16)))


@st.composite
def padded_batches(draw, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [rows, pos], attention_mask [rows, pos]): 2-4 rows of 1..MAX_POS real tokens,
    padded on the left or on the right (every row has at least one real token)."""
    lengths = draw(st.lists(st.integers(1, MAX_POS), min_size=2, max_size=4))
    side = draw(st.sampled_from(["left", "right"]))
    return padded_batch(vocab, lengths, side, seed=draw(st.integers(0, 2**16)))
