"""The measured differences behind the families' tests, per test variant, then BERT's:
`python tests/family_report.py` (TransformerLens columns need the oracle extra).

Columns (max abs differences over the same random models the tests use): float32 logits vs HF's
float64 logits, ours and HF eager's and HF sdpa's (the tests' bound is 4x the worst HF error,
tolerance.assert_as_accurate_as); left-padded rows vs each row run alone through HF; bfloat16: our
error over HF's default path's (vs HF float32, base variants; the tests allow 1.25); TL weights vs TL 3.9's
converter (biased variants: the keys its converter does not zero; "n/a": TL 3.9 has no
converter for it); every cached activation vs HookedTransformer built from the same weights,
in float64 and in float32.

BERT's table (padded batches with token types; differences relative to the logit or activation
scale): fp32 MLM logits vs HF eager, HF sdpa and HF float64, beside HF's own eager-vs-sdpa gap;
right-padded rows vs alone; TL weights vs convert_bert_weights; every cached activation vs
HookedEncoder in float64 and float32 (worst over hooks)."""

from __future__ import annotations

import os
import sys

import torch

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "parity")]

import functional_bridge as fb  # noqa: E402
from family_helpers import ALL_VARIANTS, VOCAB, float64_logits, make_family, supports  # noqa: E402
from helpers import max_diff, padded_batch, random_tokens  # noqa: E402
from test_tl_oracle_families import BIASED_VARIANTS, ORACLE_VARIANTS, hooked_transformer, tl_conversion  # noqa: E402
import bert_report  # noqa: E402

ZEROED_BY_TL = ("b_Q", "b_K", "b_V", "_b_K", "_b_V", "b_O")


def logits_vs_float64(family, variant) -> list:
    """[ours, HF eager, HF sdpa] float32 errors against HF's float64 logits."""
    tokens = random_tokens(3, 19, VOCAB)
    reference = None
    row = []
    for attn in ("eager", "sdpa"):
        hf = make_family(family, variant, attn=attn)
        reference = float64_logits(hf, tokens) if reference is None else reference
        if not row:
            row.append(max_diff(fb.Bridge.from_hf(hf)(tokens), reference))
        row.append(max_diff(hf(tokens).logits, reference) if supports(hf, attn) else None)
    return row


def bf16_over_hf(family, variant):
    """Our bfloat16 error over HF's (its default attention), both vs HF float32 (base variants)."""
    if variant != "base":
        return None
    from test_families import _bf16_errors

    e = _bf16_errors(family, 0)
    return e["ours"] / e.get("hf_sdpa", e["hf_eager"])


def padded_vs_alone(family, variant):
    hf = make_family(family, variant)
    lengths = [11, 6, 1, 8]
    tokens, mask = padded_batch(VOCAB, lengths, "left")
    logits = fb.Bridge.from_hf(hf)(tokens, attention_mask=mask)
    return max(
        max_diff(logits[row][mask[row].bool()], hf(tokens[row][mask[row].bool()][None]).logits[0])
        for row in range(len(lengths))
    )


def tl_weights_vs_converter(family, variant, transformer_lens):
    hf = make_family(family, variant)
    ours = fb.Bridge.from_hf(hf).tl_parameters()
    expected = tl_conversion(hf, transformer_lens)
    biased = (family, variant) in BIASED_VARIANTS
    keys = [k for k in expected if not (biased and k.split(".")[-1] in ZEROED_BY_TL)]
    return max(max_diff(ours[k], expected[k]) for k in keys)


def cache_vs_hooked_transformer(family, variant, transformer_lens, dtype):
    hf = make_family(family, variant).to(dtype)
    bridge, model = fb.Bridge.from_hf(hf), hooked_transformer(hf, transformer_lens)
    tokens = random_tokens(3, 12, VOCAB)
    _, cache = bridge.run_with_cache(tokens)
    _, tl_cache = model.run_with_cache(tokens)
    worst = 0.0
    for name, value in tl_cache.items():
        finite = value.isfinite()  # masked attention scores are -inf in both
        worst = max(worst, max_diff(cache[name][finite], value[finite]))
    return worst


def fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2g}" if 0.1 < value < 10 else f"{value:.1e}"


@torch.no_grad()
def main() -> None:
    try:
        import transformer_lens
    except ImportError:
        transformer_lens = None
    print("| family | variant | ours vs f64 | HF eager vs f64 | HF sdpa vs f64 | padded vs alone | bf16 ours/HF | TL weights | cache f64 | cache f32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family, variant in ALL_VARIANTS:
        row = [*logits_vs_float64(family, variant), padded_vs_alone(family, variant), bf16_over_hf(family, variant)]
        oracle = transformer_lens is not None and (family, variant) in ORACLE_VARIANTS + BIASED_VARIANTS
        row.append(tl_weights_vs_converter(family, variant, transformer_lens) if oracle else None)
        for dtype in (torch.float64, torch.float32):
            cached = oracle and (family, variant) in ORACLE_VARIANTS
            row.append(cache_vs_hooked_transformer(family, variant, transformer_lens, dtype) if cached else None)
        print(f"| {family} | {variant} | " + " | ".join(fmt(v) for v in row) + " |")
    print()
    bert_report.main(transformer_lens)


if __name__ == "__main__":
    main()
