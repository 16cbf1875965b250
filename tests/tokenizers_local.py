"""Real HF tokenizers built locally (no hub): small BPEs trained in memory with the `tokenizers`
library and wrapped as PreTrainedTokenizerFast, with the special tokens of the tokenizers they
stand in for. Shared by the tests of text methods, generation, SAEs...

- gpt2_tokenizer(): byte-level BPE, bos = eos = unk = "<|endoftext|>", no pad token (GPT-2's);
  it does not add BOS by itself.
- llama_tokenizer(): SentencePiece-style BPE ("▁" for spaces), "<unk>", "<s>", "</s>", adding
  "<s>" in front of every text by itself, no pad token (Llama's).
- bert_tokenizer(): a WordPiece BertTokenizer (lowercasing, "##" continuations) over the corpus's
  words, with BERT's special tokens ("[PAD]" 0, "[UNK]", "[CLS]", "[SEP]", "[MASK]"), wrapping every
  text as [CLS] ... [SEP] and pairs as [CLS] A [SEP] B [SEP] with token types 0 then 1.

save_pretrained(model, tokenizer) writes both into a new directory for Bridge.from_pretrained.
"""

from __future__ import annotations

import functools
import re
import tempfile

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When Tom and James went to the park, James gave a ball to Tom.",
    "The cat sat on the mat. The dog sat on the log.",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "1 2 3 4 5 6 7 8 9 10, repeated tokens repeated tokens.",
]


@functools.lru_cache(maxsize=None)
def _gpt2_backend(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def gpt2_tokenizer(vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer of at most vocab_size tokens ("<|endoftext|>" is id 0)."""
    special = "<|endoftext|>"
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_gpt2_backend(vocab_size).to_str()),
        bos_token=special, eos_token=special, unk_token=special,
    )  # fmt: skip


@functools.lru_cache(maxsize=None)
def _llama_backend(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def llama_tokenizer(vocab_size: int = 160) -> transformers.PreTrainedTokenizerFast:
    """A Llama-like tokenizer ("<unk>" 0, "<s>" 1, "</s>" 2) that prepends "<s>" itself."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_llama_backend(vocab_size).to_str()),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )  # fmt: skip


BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT_EXTRA = ["paris", "is", "capital", "of", "france", "play", "walk", "jump", "##s", "##ing", "##ed", "?"]


def bert_vocab(vocab_size: int) -> dict[str, int]:
    """BERT's specials, the corpus's words (lowercased, punctuation split off), a few wordpieces,
    then "[unusedN]" fillers up to exactly vocab_size tokens (as BERT's vocab reserves them)."""
    words = list(BERT_SPECIAL)
    for word in [w for text in CORPUS for w in re.findall(r"\w+|[^\w\s]", text.lower())] + BERT_EXTRA:
        if word not in words:
            words.append(word)
    if len(words) > vocab_size:
        raise ValueError(f"bert_vocab needs vocab_size >= {len(words)}, got {vocab_size}")
    words += [f"[unused{i}]" for i in range(vocab_size - len(words))]
    return {word: index for index, word in enumerate(words)}


def bert_tokenizer(vocab_size: int = 97) -> transformers.BertTokenizerFast:
    """A BERT-like WordPiece tokenizer of exactly vocab_size tokens (see the module docstring)."""
    return transformers.BertTokenizerFast(vocab=bert_vocab(vocab_size))


def save_pretrained(model, tokenizer, directory: str | None = None) -> str:
    """Save an HF model and its tokenizer side by side (a new temporary directory by default)."""
    directory = directory or tempfile.mkdtemp(prefix="fb_model_")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
