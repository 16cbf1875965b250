"""BERT's rows of tests/family_report.py: the measured differences behind tests/test_bert.py and
tests/parity/test_tl_oracle_bert.py, on the same models and batches, relative to each scale."""

from __future__ import annotations

import os
import sys

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "parity")]

import functional_bridge as fb
from bert_helpers import ARCHITECTURES, bert_batch, float64_reference, hf_logits, make_bert
from helpers import max_diff


def _relative(a, b) -> float:
    return max_diff(a, b) / b.abs().max().item()


def logits_row(architecture: str, side: str) -> list[float]:
    hf = make_bert(architecture)
    tokens, mask, types = bert_batch([13, 9, 4, 11], side)
    inputs = dict(attention_mask=mask, token_type_ids=types)
    reference = float64_reference(hf, tokens, **inputs)
    paths = {}
    for attn in ("eager", "sdpa"):
        hf.set_attn_implementation(attn)
        paths[attn] = hf_logits(hf, tokens, **inputs)
    ours = fb.Bridge.from_hf(hf)(tokens, **inputs)
    return [_relative(ours, paths["eager"]), _relative(ours, paths["sdpa"]), _relative(ours, reference),
            _relative(paths["eager"], reference), _relative(paths["sdpa"], reference), _relative(paths["eager"], paths["sdpa"])]  # fmt: skip


def right_padding_vs_alone(architecture: str) -> float:
    hf = make_bert(architecture)
    tokens, mask, types = bert_batch([13, 6], "right")
    padded = fb.Bridge.from_hf(hf)(tokens, attention_mask=mask, token_type_ids=types)
    real = mask[1].bool()
    return _relative(padded[1][real], hf_logits(hf, tokens[1][real][None], token_type_ids=types[1][real][None])[0])


def oracle_row(architecture: str, transformer_lens) -> list[float]:
    import test_tl_oracle_bert as oracle

    hf = make_bert(architecture, type_vocab_size=2)
    ours, expected = fb.Bridge.from_hf(hf).tl_parameters(), oracle.tl_conversion(hf, transformer_lens)
    row = [max(max_diff(value, expected[key]) for key, value in ours.items())]
    _, _, _, tl64 = oracle._caches(architecture, "right", torch.float64, transformer_lens)
    for dtype in (torch.float64, torch.float32):
        _, cache, _, _ = oracle._caches(architecture, "right", dtype, transformer_lens)
        row.append(max(oracle._relative_errors(cache, tl64).values()))
    return row


@torch.no_grad()
def main(transformer_lens=None) -> None:
    print("| BERT | padding | vs HF eager | vs HF sdpa | vs HF f64 | HF eager vs f64 | HF sdpa vs f64 | HF eager vs sdpa "
          "| right-padded vs alone | TL weights | cache f64 | cache f32 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for architecture in ARCHITECTURES:
        for side in ("right", "left"):
            row = logits_row(architecture, side)
            row.append(right_padding_vs_alone(architecture) if side == "right" else None)
            oracle = transformer_lens is not None and side == "right"
            row += oracle_row(architecture, transformer_lens) if oracle else [None] * 3
            print(f"| {architecture} | {side} | " + " | ".join("n/a" if v is None else f"{v:.1e}" for v in row) + " |")


if __name__ == "__main__":
    try:
        import transformer_lens
    except ImportError:
        transformer_lens = None
    main(transformer_lens)
