"""The Bridge's tokenizer methods, with HookedTransformer 3.9's names and semantics: to_tokens,
to_string, to_str_tokens, to_single_token, to_single_str_token, get_token_position,
tokens_to_residual_directions, set_tokenizer; and how forward's input becomes tokens and mask.
For an encoder (BERT) they follow HookedEncoder instead (encoder_text.py): the tokenizer is used as
given, ``to_tokens`` returns (tokens, token_type_ids, attention_mask), text is padded on the right
and never gets a hand-prepended BOS.

The tokenizer and the defaults are facade state (``bridge.tokenizer``, ``bridge.cfg
.default_prepend_bos``, ``tokenizer.padding_side``); per-call ``prepend_bos`` / ``padding_side``
are passed down, never written into that state.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..analysis.residual import tokens_to_residual_directions
from ..architectures import family_for
from ..architectures.family import MASKED_LM
from ..placement import input_device
from ..weights import tl_weights
from . import encoder_text as enc
from . import tokens as tok


class TLTextMixin:
    tokenizer = None  # a transformers tokenizer, or None; set with set_tokenizer

    @property
    def _is_encoder(self) -> bool:
        return family_for(self._config).kind == MASKED_LM

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        """Use this tokenizer, as HookedTransformer.set_tokenizer (reloaded with BOS where it can
        be, pad/eos/bos filled in, cfg.tokenizer_prepends_bos detected). An encoder uses it as
        given, as HookedEncoder does (only default_padding_side is applied; it must be "right")."""
        if self._is_encoder:
            tok.check_tokenizer(tokenizer)
            enc.check_encoder_text_options(self._config.original_architecture, None, default_padding_side, "default_padding_side")
            if default_padding_side is not None:
                tokenizer.padding_side = default_padding_side
            self.tokenizer = tokenizer
            return
        self.tokenizer, self._tl.tokenizer_prepends_bos = tok.prepare_tokenizer(
            tokenizer, self._config.original_architecture, default_padding_side
        )

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and this Bridge has none: pass tokenizer= to from_hf / "
                "from_config, load a directory holding one with from_pretrained, or call set_tokenizer(tokenizer)"
            )
        return self.tokenizer

    def _encode(self, input, prepend_bos, padding_side, truncate: bool = True, move_to_device: bool = True) -> enc.EncodedText:
        """An encoder's (tokens, token_type_ids, attention_mask) [batch, pos]: HookedEncoder.to_tokens."""
        tokenizer = self._require_tokenizer("tokenizing text")
        arch = self._config.original_architecture
        if prepend_bos is None:
            enc.check_encoder_text_options(arch, self._tl.default_prepend_bos, padding_side, bos_source="cfg.default_prepend_bos")
        enc.check_encoder_text_options(arch, prepend_bos, padding_side)
        encoded = enc.encoder_tokenize(tokenizer, input, architecture=arch, max_length=self._config.n_ctx if truncate else None)
        if move_to_device:
            device = input_device(self.params, self._config)
            encoded = enc.EncodedText(*(t.to(device) for t in encoded))
        return encoded

    def _tokenize(self, input, prepend_bos, padding_side, truncate: bool = True, move_to_device: bool = True):
        """(tokens, padding mask) [batch, pos] for text, as TransformerLens's to_tokens."""
        if self._is_encoder:
            tokens, _, mask = self._encode(input, prepend_bos, padding_side, truncate, move_to_device)
            return tokens, mask
        tokenizer = self._require_tokenizer("tokenizing text")
        tokens, mask = tok.tokenize(
            tokenizer, input,
            prepend_bos=self._tl.default_prepend_bos if prepend_bos is None else bool(prepend_bos),
            prepends_bos=bool(self._tl.tokenizer_prepends_bos),
            padding_side=tokenizer.padding_side if padding_side is None else padding_side,
            max_length=self._config.n_ctx if truncate else None,
        )  # fmt: skip
        if move_to_device:
            device = input_device(self.params, self._config)  # leaves placed by layer: the embedding's
            tokens, mask = tokens.to(device), mask.to(device)
        return tokens, mask

    def to_tokens(
        self, input: str | Sequence[str], prepend_bos: bool | None = None, padding_side: str | None = None,
        move_to_device: bool = True, truncate: bool = True,
    ) -> Tensor | enc.EncodedText:  # fmt: skip
        """Text (or a list of texts, padded) -> token ids [batch, pos]. An encoder returns
        HookedEncoder's (tokens, token_type_ids, attention_mask), and also takes a list of
        (text_a, text_b) pairs; prepend_bos=True and left padding are refused for it."""
        if self._is_encoder:
            return self._encode(input, prepend_bos, padding_side, truncate, move_to_device)
        return self._tokenize(input, prepend_bos, padding_side, truncate, move_to_device)[0]

    def to_string(self, tokens) -> str | list[str]:
        """Token ids -> text: a string for [pos], a list of strings for [batch, pos]."""
        return tok.decode(self._require_tokenizer("to_string"), tokens)

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None):
        """Text or token ids [pos] / [1, pos] -> each token as a string (a list of inputs -> a
        list of results). For an encoder, text's tokens include the [CLS] and [SEP] it sees,
        and a (text_a, text_b) pair is one input."""
        if isinstance(input, list):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        tokenizer = self._require_tokenizer("to_str_tokens")
        pair = self._is_encoder and isinstance(input, tuple) and len(input) == 2 and all(isinstance(s, str) for s in input)
        if isinstance(input, str) or pair:
            input = self._tokenize([input] if pair else input, prepend_bos, padding_side)[0][0]
        elif not hasattr(input, "shape"):
            raise ValueError(f"to_str_tokens takes text, a tensor or an array of tokens, got {type(input).__name__}")
        return tok.str_tokens(tokenizer, input)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (an error otherwise); an encoder's
        tokenizer reads it without its [CLS] and [SEP]."""
        if self._is_encoder:
            return enc.single_token_id(self._require_tokenizer("to_single_token"), string)
        token = self.to_tokens(string, prepend_bos=False).squeeze()
        if token.dim():
            raise ValueError(f"{string!r} is not a single token: it is {self.to_str_tokens(string, prepend_bos=False)}")
        return int(token)

    def to_single_str_token(self, int_token: int) -> str:
        if not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes an int, got {type(int_token).__name__}")
        (token,) = self.to_str_tokens(tok.as_token_tensor([int_token]))
        return token

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos=None, padding_side=None) -> int:
        """Where single_token (a string of one token, or an id) first ("first") or last ("last")
        occurs in input (text, or tokens [pos] / [1, pos])."""
        tokens = self._tokenize(input, prepend_bos, padding_side)[0] if isinstance(input, str) else input
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"tokens must be [pos] or [1, pos], got {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token)
        positions = (tokens == single_token).nonzero()[:, 0]
        if positions.numel() == 0:
            raise ValueError(f"token {single_token} does not occur in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        return int(positions[0] if mode == "first" else positions[-1])

    def tokens_to_residual_directions(self, tokens) -> Tensor:
        """The unembedding direction of each token (a string of one token, an id, or a tensor of
        ids): [d_model], or [*tokens.shape, d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        return tokens_to_residual_directions(tl_weights(self.params, self._config), tokens)

    def _model_input(self, input, prepend_bos, padding_side, attention_mask, token_type_ids=None):
        """forward's input as (tokens, padding mask or None, token types or None). Text
        (tokenized onto the params' device) gets the tokenizer's padding mask, and for an encoder
        its token types (HookedEncoder's: those passed win); token ids with a causal LM's
        tokenizer padding on the left get the mask TransformerLens guesses from pad ids (it does
        so for left padding only; HookedEncoder never guesses). A mask the facade made is dropped
        when it masks nothing (the unmasked path is faster and equal); a mask the caller passed
        is used as given."""
        if isinstance(input, (str, list, tuple)):
            if self._is_encoder:
                tokens, types, mask = self._encode(input, prepend_bos, padding_side)
                token_type_ids = types if token_type_ids is None else token_type_ids
            else:
                tokens, mask = self._tokenize(input, prepend_bos, padding_side)
            if attention_mask is not None:
                mask = attention_mask
            elif bool(mask.all()):
                mask = None
        else:
            tokens, mask = input, attention_mask
            if not isinstance(tokens, Tensor):
                raise TypeError(f"input must be text, a list of texts or a tensor of token ids, got {type(input).__name__}")
            if self._is_encoder:
                enc.check_encoder_text_options(self._config.original_architecture, prepend_bos, padding_side)
                return tokens, mask, token_type_ids
            side = None if self.tokenizer is None else (padding_side or self.tokenizer.padding_side)
            if mask is None and side == "left":
                prepend = self._tl.default_prepend_bos if prepend_bos is None else prepend_bos
                rows = tokens if tokens.dim() == 2 else tokens[None]
                guessed = tok.mask_from_pad_ids(self.tokenizer, rows, prepend, side)
                mask = None if bool(guessed.all()) else guessed.view(tokens.shape)
        return tokens, mask, token_type_ids
