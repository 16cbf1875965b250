"""Small random BERT models (BertForMaskedLM, BertForPreTraining) built to make errors visible:
an odd layer count, weights large enough that logits span several units, norms and biases
moved off their init values, token-type embeddings that differ, and queries/keys scaled so that
attention is peaked; plus padded batches with token types, and the float64 reference."""

from __future__ import annotations

import torch
import transformers as T

from helpers import padding_mask, random_tokens

VOCAB = 97
ARCHITECTURES = ["BertForMaskedLM", "BertForPreTraining"]
TINY_BERT = dict(
    vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
    max_position_embeddings=40, type_vocab_size=3, initializer_range=0.15,
)  # fmt: skip


def bert_config(**overrides) -> T.BertConfig:
    unknown = set(overrides) - set(T.BertConfig().to_dict())
    if unknown:
        raise TypeError(f"bert_config: {sorted(unknown)} are not BertConfig fields")
    return T.BertConfig(**{**TINY_BERT, **overrides})


@torch.no_grad()
def perturb_bert_(model, seed: int = 0, qk_scale: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen).to(param.dtype)
        if param.dim() == 1:  # biases and LayerNorm weights
            param.add_(0.2 * noise)
        if name.endswith(("query.weight", "key.weight")):
            param.mul_(qk_scale)
    return model


def make_bert(architecture: str = "BertForMaskedLM", seed: int = 0, attn: str = "sdpa", qk_scale: float = 2.0, **overrides):
    torch.manual_seed(seed)
    model = getattr(T, architecture)(bert_config(**overrides)).eval()
    model.set_attn_implementation(attn)
    return perturb_bert_(model, seed, qk_scale)


def hf_logits(model, tokens, **inputs) -> torch.Tensor:
    """The MLM logits of either architecture (BertForPreTraining calls them prediction_logits)."""
    out = model(tokens, **inputs)
    return out.logits if hasattr(out, "logits") else out.prediction_logits


def bert_batch(lengths: list[int], side: str = "right", seed: int = 0, n_types: int = 3):
    """tokens, attention_mask and token_type_ids [rows, max(lengths)]: each row's real tokens are
    two segments (types 0 then 1, the last row using type n_types - 1), padding on ``side``."""
    mask = padding_mask(lengths, side)
    tokens = random_tokens(len(lengths), mask.shape[1], VOCAB, seed=seed)
    types = torch.zeros_like(tokens)
    for row, n in enumerate(lengths):
        real = mask[row].nonzero()[:, 0]
        types[row, real[n // 2 :]] = 1 if row < len(lengths) - 1 else n_types - 1
    return tokens, mask, types


def float64_reference(model, tokens, **inputs) -> torch.Tensor:
    """HF's logits with the model in float64 (eager attention): the reference rounding errors
    are measured against. The model is returned to its dtype and attention afterwards."""
    dtype, attn = next(model.parameters()).dtype, model.config._attn_implementation
    model.to(torch.float64).set_attn_implementation("eager")
    try:
        return hf_logits(model, tokens, **inputs)
    finally:
        model.to(dtype).set_attn_implementation(attn)
