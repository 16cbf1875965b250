"""Text <-> tokens for an encoder (BERT), with TransformerLens 3.9's HookedEncoder semantics, as
functions of a tokenizer.

HookedEncoder uses its tokenizer as given: ``to_tokens`` returns (tokens, token_type_ids,
attention_mask) [batch, pos] straight from the tokenizer (padded, truncated to n_ctx), which wraps
each text as ``[CLS] ... [SEP]`` itself; nothing is prepended by hand. So here:

- ``prepend_bos=True`` is refused (an encoder has no BOS; the tokenizer adds [CLS]), ``False`` or
  ``None`` mean what the tokenizer does;
- padding is on the right: BERT counts positions absolutely, padding included (HF's rule), so
  left padding would move each row's real tokens to other positions and its logits with them;
- a list of (text_a, text_b) pairs is one batch of sentence pairs (token types 0, then 1), as the
  tokenizer reads it;
- ``return_type="predictions"`` (HookedEncoder's masked-LM answer) is ``mlm_predictions``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

ENCODER_PADDING_SIDE = "right"


class EncodedText(NamedTuple):
    """HookedEncoder.to_tokens's triple."""

    tokens: Tensor  # [batch, pos]
    token_type_ids: Tensor  # [batch, pos]
    attention_mask: Tensor  # [batch, pos], 1 at real tokens


def check_encoder_text_options(architecture: str, prepend_bos, padding_side, source: str = "padding_side",
                               bos_source: str = "prepend_bos") -> None:  # fmt: skip
    """Refuse, by name, text options an encoder cannot honour (see the module docstring).
    source / bos_source: the names the values were given under (an argument, a default, the
    tokenizer's attribute)."""
    if prepend_bos:
        raise ValueError(
            f"{bos_source}=True is not available for {architecture}, an encoder: it has no BOS token, and its tokenizer "
            "wraps each text as [CLS] ... [SEP] itself (HookedEncoder.to_tokens takes no prepend_bos); leave it unset"
        )
    if padding_side is not None and padding_side != ENCODER_PADDING_SIDE:
        raise ValueError(
            f"{source}={padding_side!r} is not available for {architecture}, an encoder: it counts positions "
            "absolutely, padding included (as HF does), so padding on the left would shift each shorter row's tokens "
            f"to other positions and change its logits; it pads on the {ENCODER_PADDING_SIDE}"
        )


def _as_text_batch(text) -> str | list:
    """A string, or a non-empty list of strings or of (text_a, text_b) pairs (a tuple of strings
    is a batch, as the tokenizer reads it)."""
    if isinstance(text, str):
        return text
    if isinstance(text, (list, tuple)) and text:
        items = list(text)
        if all(isinstance(s, str) for s in items):
            return items
        if all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in items):
            return [tuple(p) for p in items]
    raise TypeError(
        "an encoder's text is a string, or a non-empty list of strings or of (text_a, text_b) pairs; "
        f"got {type(text).__name__}" + (f" of {[type(x).__name__ for x in text][:4]}" if isinstance(text, (list, tuple)) else "")
    )


def encoder_tokenize(tokenizer, text: str | Sequence, *, architecture: str, max_length: int | None) -> EncodedText:
    """HookedEncoder.to_tokens: the tokenizer's own encoding of text (padded on the right,
    truncated to max_length unless it is None). The tokenizer itself must pad on the right."""
    text = _as_text_batch(text)
    if tokenizer.padding_side != ENCODER_PADDING_SIDE:
        check_encoder_text_options(architecture, None, tokenizer.padding_side, "tokenizer.padding_side")
    encoded = tokenizer(text, return_tensors="pt", padding=True, truncation=max_length is not None, max_length=max_length)
    tokens = encoded["input_ids"]
    types = encoded.get("token_type_ids")
    mask = encoded.get("attention_mask")
    return EncodedText(
        tokens,
        torch.zeros_like(tokens) if types is None else types,
        torch.ones_like(tokens) if mask is None else mask,
    )


def single_token_id(tokenizer, string: str) -> int:
    """The id of a string that the tokenizer reads as exactly one token, without its [CLS]/[SEP]
    (HookedTransformer's to_single_token; TransformerLens's bridge strips [CLS] only and fails)."""
    ids = tokenizer(string, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{string!r} is not a single token: it is {tokenizer.convert_ids_to_tokens(ids)}")
    return int(ids[0])


def mlm_predictions(tokenizer, logits: Tensor, tokens: Tensor) -> str | list[str]:
    """HookedEncoder's return_type="predictions": the most likely token at each mask token, rows
    in order; one string for one mask, else ["Prediction 0: ...", ...]. Unlike TransformerLens,
    each prediction is decoded alone (TL decodes them together and splits on spaces, which merges
    "##" continuations into their neighbour and miscounts), and an input without a mask token is
    an error (TL returns "")."""
    mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise ValueError("return_type='predictions' needs a tokenizer with a mask token (mask_token is None)")
    tokens = tokens if tokens.dim() == 2 else tokens[None]
    at_mask = tokens.to(logits.device) == mask_id  # [batch, pos]
    if not bool(at_mask.any()):
        raise ValueError(f"return_type='predictions' predicts the {tokenizer.mask_token} tokens, and the input has none")
    best = logits[at_mask].argmax(-1).tolist()  # [n_masks]: argmax of logits = argmax of log-probs
    words = [tokenizer.decode([i]) for i in best]
    return words[0] if len(words) == 1 else [f"Prediction {i}: {word}" for i, word in enumerate(words)]
