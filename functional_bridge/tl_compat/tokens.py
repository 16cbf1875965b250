"""Text <-> tokens with HookedTransformer 3.9's semantics, as functions of a tokenizer.

The Bridge facade holds the tokenizer and the defaults (``default_prepend_bos``, the
tokenizer's ``padding_side``); these functions take them as arguments and never change them
(TransformerLens overrides its defaults in place for the duration of a call).

BOS handling is TransformerLens's: ``set_tokenizer`` reloads the tokenizer with
``add_bos_token=True`` where it can, records whether it prepends BOS by itself
(``tokenizer_prepends_bos``), and ``to_tokens`` then prepends it by hand (as text) or strips the
one the tokenizer added, so that ``prepend_bos`` means the same thing for every tokenizer.
Unlike TransformerLens, tokenizing also returns the tokenizer's own padding mask, which the
facade hands to the forward for every string batch.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor

# HF classes whose TransformerLens config sets default_prepend_bos=False (loading_from_pretrained).
NO_DEFAULT_BOS = frozenset(
    {"GPTNeoXForCausalLM", "BloomForCausalLM", "QWenLMHeadModel", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "PhiForCausalLM"}
)
# HF classes whose tokenizer TransformerLens does not reload with add_bos_token=True.
KEEP_TOKENIZER = frozenset({"OlmoForCausalLM", "OlmoeForCausalLM", "Olmo2ForCausalLM"})


def default_prepend_bos(architecture: str) -> bool:
    """HookedTransformer's cfg.default_prepend_bos for a model class."""
    return architecture not in NO_DEFAULT_BOS


def prepare_tokenizer(tokenizer, architecture: str, default_padding_side: str | None = None):
    """TransformerLens's set_tokenizer: (tokenizer to use, whether it prepends BOS by itself).
    The tokenizer is reloaded with add_bos_token=True when it can be (from its own files);
    eos, pad and bos default to each other as TransformerLens sets them."""
    check_tokenizer(tokenizer)
    if default_padding_side not in ("left", "right", None):
        raise ValueError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
    if architecture not in KEEP_TOKENIZER:
        tokenizer = _with_bos(tokenizer)
    if default_padding_side is not None:
        tokenizer.padding_side = default_padding_side
    if tokenizer.padding_side is None:
        tokenizer.padding_side = "right"
    if tokenizer.eos_token is None:
        tokenizer.eos_token = "<|endoftext|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer, len(tokenizer.encode("")) > 0


def check_tokenizer(tokenizer) -> None:
    from transformers import PreTrainedTokenizerBase

    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}")


def _with_bos(tokenizer):
    """TransformerLens's get_tokenizer_with_bos: the same tokenizer loaded with add_bos_token=True
    (some tokenizers, Llama's, tokenize differently with a BOS they add themselves). Kept as
    it is when it has no BOS, already adds it, or cannot be reloaded from its files."""
    if tokenizer.bos_token is None:
        return tokenizer
    kwargs = copy.deepcopy(tokenizer.init_kwargs)
    path = kwargs.pop("name_or_path", None) or getattr(tokenizer, "name_or_path", None)
    add_bos = kwargs.pop("add_bos_token", None)
    if (add_bos if add_bos is not None else getattr(tokenizer, "add_bos_token", False)) or not path:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        reloaded = AutoTokenizer.from_pretrained(path, add_bos_token=True, **kwargs)
    except (OSError, ValueError, TypeError):  # not loadable from its files (e.g. built in memory)
        return tokenizer
    reloaded.padding_side = tokenizer.padding_side
    return reloaded


def tokenize(
    tokenizer, text: str | Sequence[str], *, prepend_bos: bool, prepends_bos: bool, padding_side: str, max_length: int | None
) -> tuple[Tensor, Tensor]:
    """(tokens, mask) [batch, pos]: TransformerLens's to_tokens, plus the tokenizer's padding mask
    (1 at real tokens, BOS included). max_length: truncate to it (None: no truncation)."""
    if isinstance(text, (list, tuple)) and text and all(isinstance(s, str) for s in text):
        text = list(text)
    elif not isinstance(text, str):
        raise TypeError(f"text must be a string or a non-empty list of strings, got {type(text).__name__}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if prepend_bos and not prepends_bos and tokenizer.bos_token is not None:
        bos = tokenizer.bos_token
        text = bos + text if isinstance(text, str) else [bos + s for s in text]
    encoded = tokenizer(
        text, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length,
        padding_side=padding_side,
    )  # fmt: skip
    tokens = encoded["input_ids"]
    mask = encoded.get("attention_mask")
    mask = torch.ones_like(tokens) if mask is None else mask
    if not prepend_bos and prepends_bos and tokenizer.bos_token_id is not None:
        tokens, mask = _without_bos(tokens, mask, padding_side)
    return tokens, mask


def _without_bos(tokens: Tensor, mask: Tensor, padding_side: str) -> tuple[Tensor, Tensor]:
    """Drop the BOS the tokenizer put before each row's first real token (TL's
    get_tokens_with_bos_removed), from the tokens and the mask alike."""
    if padding_side == "right":
        return tokens[:, 1:], mask[:, 1:]
    first_real = mask.int().argmax(-1)  # [batch]: the BOS, after the left padding
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[torch.arange(tokens.shape[0]), first_real] = False
    shape = (tokens.shape[0], tokens.shape[1] - 1)
    return tokens[keep].view(shape), mask[keep].view(shape)


def mask_from_pad_ids(tokenizer, tokens: Tensor, prepend_bos: bool, padding_side: str) -> Tensor:
    """TransformerLens's get_attention_mask: the padding mask guessed from pad ids (leading pads
    with left padding, trailing ones with right padding; a BOS equal to the pad id is kept)."""
    mask = torch.ones_like(tokens)
    if tokenizer.pad_token_id is None:
        return mask
    real = tokens.ne(tokenizer.pad_token_id)
    if padding_side == "right":
        mask[real.flip(-1).cumsum(-1).flip(-1) == 0] = 0
        return mask
    leading = real.cumsum(-1) == 0
    mask[leading] = 0
    if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
        mask[torch.arange(tokens.shape[0]), leading.sum(-1) - 1] = 1
    return mask


def as_token_tensor(tokens) -> Tensor:
    if isinstance(tokens, Tensor):
        return tokens
    import numpy as np

    if isinstance(tokens, np.ndarray):
        return torch.from_numpy(tokens)
    return torch.tensor(tokens)


def decode(tokenizer, tokens) -> str | list[str]:
    """TransformerLens's to_string: one string for [pos] (or a scalar), a list for [batch, pos]."""
    tokens = as_token_tensor(tokens)
    if tokens.dim() == 2:
        return tokenizer.batch_decode(tokens, clean_up_tokenization_spaces=False)
    if tokens.dim() <= 1:
        return tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
    raise ValueError(f"to_string takes [pos] or [batch, pos] tokens, got shape {tuple(tokens.shape)}")


def str_tokens(tokenizer, tokens) -> list[str]:
    """Each token of a [pos] (or [1, pos], or scalar) sequence decoded on its own."""
    tokens = as_token_tensor(tokens).squeeze()
    if tokens.dim() == 0:
        tokens = tokens[None]
    if tokens.dim() != 1:
        raise ValueError(f"to_str_tokens takes one sequence of tokens ([pos] or [1, pos]), got shape {tuple(tokens.shape)}")
    return tokenizer.batch_decode([[int(t)] for t in tokens.tolist()], clean_up_tokenization_spaces=False)
