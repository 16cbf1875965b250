"""Bridge.generate: HookedTransformer.generate's signature and behaviour on the pure loop.

The facade turns its state into arguments: text is tokenized (a batch of texts left-padded, as
TL forces), a token tensor gets TL's guessed padding mask (or the attention_mask passed), the
registered hooks (``hooks()`` context, ``add_hook``) and ``fwd_hooks`` become one HookSet that
every step's forward runs, and ``seed`` or ``generator`` drives sampling. The decoding itself is
functional_bridge.generate.generate_tokens over the functional KV cache.
"""

from __future__ import annotations

from torch import Tensor

from ..generate import generate_tokens
from . import tokens as tok

RETURN_TYPES = ("input", "str", "tokens")


class TLGenerateMixin:
    def generate(
        self,
        input="",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id=None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str | None = "input",
        verbose: bool = True,
        *,
        attention_mask: Tensor | None = None,
        fwd_hooks=(),
        seed: int | None = None,
        generator=None,
        output_logits: bool = False,
    ):
        """HookedTransformer.generate. input: text, a list of texts, or token ids [batch, pos]
        (left-padded; the mask as TL's get_attention_mask guesses it, or attention_mask).
        Returns text ('str'; one string for one row), tokens [batch, pos + new] ('tokens'), or
        the input's kind ('input'). Hooks registered on the bridge and fwd_hooks act on every
        step. seed / generator: reproducible sampling (a generator on the params' device).
        Differences from TL: freq_penalty counts real tokens only (TL also counts padding);
        embeddings as input are refused. output_logits=True (TL's one HF generation kwarg) returns
        HF's GenerateDecoderOnlyOutput(sequences, logits: one [batch, d_vocab] per step)."""
        import torch

        from ..kv_cache import refuse_encoders

        refuse_encoders(self._config)  # (before text is tokenized as an encoder's)
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES} (embeddings are not supported), got {return_type!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        device = self.cfg.device
        if isinstance(input, (str, list, tuple)):
            side = "left" if isinstance(input, (list, tuple)) and len(input) > 1 else padding_side
            tokens, mask = self._tokenize(input, prepend_bos, side)
            mask = mask if attention_mask is None else attention_mask
            kind = "str"
        elif isinstance(input, Tensor):
            if input.is_floating_point():
                raise NotImplementedError("generate from embeddings [batch, pos, d_model] is not supported: pass token ids or text")
            tokens, mask, _ = self._model_input(input, prepend_bos, padding_side, attention_mask)
            kind = "tokens"
        else:
            raise TypeError(f"input must be text, a list of texts or a tensor of token ids, got {type(input).__name__}")
        tokens = (tokens if tokens.dim() == 2 else tokens[None]).to(device)
        mask = None if mask is None else mask.reshape(tokens.shape).to(device)
        stop_tokens, pad_eos = self._stop_tokens(stop_at_eos, eos_token_id)
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(seed)
        progress = None
        if verbose:
            from tqdm.auto import tqdm

            progress = tqdm
        with torch.no_grad():
            out = generate_tokens(
                self.params, tokens, self._config, attention_mask=mask, make_hooks=lambda: self._call_hooks(fwd_hooks),
                max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, eos_token_for_padding=pad_eos, do_sample=do_sample,
                top_k=top_k, top_p=top_p, temperature=temperature, freq_penalty=freq_penalty,
                use_past_kv_cache=use_past_kv_cache, generator=generator, progress=progress, return_logits=output_logits,
            )  # fmt: skip
        if output_logits:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            out, logits = out
            return GenerateDecoderOnlyOutput(sequences=out, logits=tuple(logits.unbind(1)))
        if (return_type == "input" and kind == "tokens") or return_type == "tokens":
            return out
        tokenizer = self._require_tokenizer("generate(return_type='str')")
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out]
        return texts[0] if len(texts) == 1 else texts

    def _stop_tokens(self, stop_at_eos: bool, eos_token_id) -> tuple[list[int], int]:
        """(ids that end a row, the id written after a row ended): TL's rule."""
        if not stop_at_eos:
            return [], 0
        tokenizer_eos = None if self.tokenizer is None else self.tokenizer.eos_token_id
        if eos_token_id is None:
            if tokenizer_eos is None:
                raise ValueError("stop_at_eos=True needs eos_token_id= or a tokenizer with an eos token")
            eos_token_id = tokenizer_eos
        if isinstance(eos_token_id, int):
            return [eos_token_id], eos_token_id
        ids = [int(i) for i in eos_token_id]
        return ids, tokenizer_eos if tokenizer_eos is not None else ids[0]
