"""BERT's text API against TransformerLens 3.9's HookedEncoder holding the same weights and the same
(local WordPiece) tokenizer: to_tokens (bitwise), forward, run_with_cache and run_with_hooks from
text, and return_type="predictions".

Bounds, tests/parity/test_tl_oracle_bert.py's: in float32, each activation's error against
HookedEncoder in float64, as a fraction of its scale, at most 4x the largest such fraction TL's
own float32 run shows at that hook or before it (at least FLOOR_ULPS roundings); in float64 the
same with float64's epsilon.
"""

import pytest
import torch

import functional_bridge as fb
from bert_helpers import make_bert
from helpers import max_diff
from test_tl_oracle_bert import check_caches_against_tl, hooked_encoder
from tokenizers_local import bert_tokenizer
from tolerance import assert_rounding_close, check_above, forward_depth

pytestmark = pytest.mark.oracle

TEXTS = ["When Mary and John went to the store, John gave a drink to Mary.", "the cat sat on the mat.", "hello world!"]
PAIRS = [("the cat sat on the mat.", "the dog sat on the log."), ("hello", "the quick brown fox jumps over the lazy dog.")]
INPUTS = {"one text": TEXTS[1], "texts": TEXTS, "pairs": PAIRS}


def _pair(transformer_lens, dtype=torch.float32):
    """(Bridge, HookedEncoder) over one BertForMaskedLM's weights (two token types: TL's
    TokenTypeEmbed has two rows), each holding the same tokenizer."""
    hf = make_bert(type_vocab_size=2).to(dtype)
    tokenizer = bert_tokenizer()
    model = hooked_encoder(hf, transformer_lens)
    model.tokenizer = tokenizer
    return fb.Bridge.from_hf(hf, tokenizer=tokenizer), model


def test_to_tokens_equals_hooked_encoders(transformer_lens):
    bridge, model = _pair(transformer_lens)
    long = " ".join([TEXTS[0]] * 4)  # longer than n_ctx
    for text in [*INPUTS.values(), long]:
        for truncate in (True, False):
            ours, theirs = bridge.to_tokens(text, truncate=truncate), model.to_tokens(text, truncate=truncate)
            assert len(ours) == len(theirs) == 3
            for a, b in zip(ours, theirs):
                assert a.dtype == b.dtype and torch.equal(a, b), (text, truncate)
    assert bridge.to_tokens(long)[0].shape[1] == bridge.cfg.n_ctx


def _run(transformer_lens, dtype, text):
    bridge, model = _pair(transformer_lens, dtype)
    with torch.no_grad():
        ours, cache = bridge.run_with_cache(text)
        theirs, tl_cache = model.run_with_cache(text)
        plain, tl_plain = bridge(text), model(text)
    return (ours, dict(cache.items()), plain), (theirs, dict(tl_cache.items()), tl_plain)


@pytest.mark.parametrize("name", INPUTS)
def test_forward_and_cache_from_text_equal_hooked_encoders(name, transformer_lens):
    """bridge(text) and bridge.run_with_cache(text) against HookedEncoder's on the same text:
    every cached activation and the logits, in float32 and float64."""
    text = INPUTS[name]
    (ours32, cache32, plain32), (tl32, tl_cache32, tl_plain32) = _run(transformer_lens, torch.float32, text)
    (ours64, cache64, plain64), (tl64, tl_cache64, _) = _run(transformer_lens, torch.float64, text)
    assert list(cache32) == list(tl_cache32)
    for cache, logits, tl_cache, tl_logits in ((cache32, ours32, tl_cache32, tl32), (cache64, ours64, tl_cache64, tl64)):
        cache["logits"], tl_cache["logits"] = logits, tl_logits
        cache["plain logits"], tl_cache["plain logits"] = (plain32, tl_plain32) if cache is cache32 else (plain64, tl64)
    check_caches_against_tl(cache32, cache64, tl_cache32, tl_cache64)


def test_hooked_forward_from_text_equals_hooked_encoders(transformer_lens):
    """run_with_hooks on text with HookedEncoder's positional token types and mask left to the
    tokenizer: the same edits give the same logits (float64)."""
    bridge, model = _pair(transformer_lens, torch.float64)

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    hooks = [("blocks.1.attn.hook_z", zero_head), ("embed.hook_token_type_embed", lambda x, hook: 3 * x)]
    with torch.no_grad():
        ours = bridge.run_with_hooks(PAIRS, fwd_hooks=hooks)
        theirs = model.run_with_hooks(PAIRS, fwd_hooks=hooks)
        plain = model(PAIRS)
    assert_rounding_close(ours, theirs, n=forward_depth(bridge.cfg, ours.shape[1]), what="hooked logits from text, float64")
    check_above(max_diff(plain, theirs), 0.01 * theirs.abs().max().item(), "the hooks change the logits")


def test_predictions_equal_hooked_encoders(transformer_lens):
    """return_type="predictions" as HookedEncoder's where its joint decode is right (whole-word
    predictions): one string for one mask, "Prediction i: word" for several."""
    bridge, model = _pair(transformer_lens)
    for text in ("the cat sat on the [MASK].", ["the [MASK] sat on the mat.", "hello [MASK]!"], "the [MASK] sat on the [MASK]."):
        with torch.no_grad():
            ours, theirs = bridge(text, return_type="predictions"), model(text, return_type="predictions")
        words = [ours] if isinstance(ours, str) else [p.split(": ", 1)[1] for p in ours]
        assert not any(w.startswith("##") or " " in w for w in words)  # (TL's joint decode is right for these)
        assert ours == theirs, text
