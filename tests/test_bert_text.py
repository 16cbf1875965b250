"""Text in and out for BERT (HookedEncoder's text API on the Bridge) against HF: BertForMaskedLM
called with the tokenizer's own encoding, HF's fill-mask pipeline for the masked-LM workflow, the
tokenizer's vocabulary for single tokens; and the refusals (no tokenizer, prepend_bos=True, left
padding, a next-token loss, predictions without a mask). The tokenizer is a local WordPiece
BertTokenizer (tests/tokenizers_local.py). TransformerLens's HookedEncoder as the oracle of the
same text API: tests/parity/test_tl_oracle_bert_text.py.

Bounds: logits from text as accurate against HF's float64 logits as 2x the further of HF's own
float32 paths (eager, sdpa), and within 1e-4 of the logit scale of each (tests/test_bert.py's
bound); probabilities within float32 rounding over a forward's depth (tests/tolerance.py)."""

import pytest
import torch
import transformers

import functional_bridge as fb
from bert_helpers import VOCAB, float64_reference, hf_logits, make_bert
from helpers import make_gpt2
from tokenizers_local import bert_tokenizer, gpt2_tokenizer, save_pretrained
from tolerance import as_accurate_as_bound, assert_rounding_close, check, check_above, forward_depth, max_diff, rounding_bound

TEXTS = ["When Mary and John went to the store, John gave a drink to Mary.", "the cat sat on the mat.", "hello world!"]
PAIRS = [("the cat sat on the mat.", "the dog sat on the log."), ("hello", "the quick brown fox jumps over the lazy dog.")]
MASKED = ["the cat sat on the [MASK].", "when mary and [MASK] went to the store, john gave a drink to mary."]


@pytest.fixture
def bert():
    """(HF BertForMaskedLM, a Bridge over its tensors with the local BERT tokenizer)."""
    hf = make_bert()
    return hf, fb.Bridge.from_hf(hf, tokenizer=bert_tokenizer())


def hf_on_text(hf, tokenizer, text, reference=hf_logits):
    """HF's logits (or reference=float64_reference's) on the tokenizer's own encoding of text."""
    encoded = dict(tokenizer(text, return_tensors="pt", padding=True))
    return reference(hf, encoded.pop("input_ids"), **encoded)


def _hf_from_text(hf, tokenizer, text):
    """HF's logits (eager, sdpa) and float64 reference on the tokenizer's own encoding of text."""
    out = {}
    for attn in ("eager", "sdpa"):
        hf.set_attn_implementation(attn)
        out[attn] = hf_on_text(hf, tokenizer, text)
    return out, hf_on_text(hf, tokenizer, text, float64_reference)


@pytest.mark.parametrize("text", [TEXTS[0], TEXTS, PAIRS], ids=["one text", "texts", "pairs"])
def test_logits_from_text_equal_hf_on_the_tokenizers_encoding(bert, text):
    """A string, a padded batch of strings, and a batch of sentence pairs (token types 0 then 1):
    the bridge passes the tokenizer's tokens, token types and padding mask, as HF is called."""
    hf, bridge = bert
    with torch.no_grad():
        paths, reference = _hf_from_text(hf, bridge.tokenizer, text)
        ours = bridge(text)
    scale = reference.abs().max().item()
    for attn, logits in paths.items():
        check(max_diff(ours, logits), 1e-4 * scale, f"vs HF {attn}, relative to the logit scale")
    further = max(paths.values(), key=lambda logits: max_diff(logits, reference))
    check(max_diff(ours, reference), as_accurate_as_bound(further, reference, factor=2.0), "vs float64, 2x HF's further path")
    if text is PAIRS:  # the token types reach the model: without them the answer is far off
        tokens, _, mask = bridge.to_tokens(text)
        with torch.no_grad():
            untyped = bridge(tokens, attention_mask=mask)
        check_above(max_diff(untyped, reference), 100 * 1e-4 * scale, "pairs without their token types")


def test_to_tokens_is_the_tokenizers_encoding_padded_right_and_truncated(bert):
    """HookedEncoder.to_tokens: (tokens, token_type_ids, attention_mask), padded on the right,
    truncated to n_ctx (keeping the final [SEP]) unless truncate=False."""
    _, bridge = bert
    tokenizer = bridge.tokenizer
    for text in (TEXTS[1], TEXTS, PAIRS):
        tokens, types, mask = bridge.to_tokens(text)
        expected = tokenizer(text, return_tensors="pt", padding=True)
        assert torch.equal(tokens, expected["input_ids"]) and torch.equal(types, expected["token_type_ids"])
        assert torch.equal(mask, expected["attention_mask"])
    assert mask[0, -1] == 1 and mask[1, -1] == 0 and types[:, 0].eq(0).all() and types[0].max() == 1  # pairs
    long = " ".join([TEXTS[0]] * 4)
    n_ctx = bridge.cfg.n_ctx
    tokens, _, mask = bridge.to_tokens(long)
    assert tokens.shape == (1, n_ctx) and tokens[0, 0] == tokenizer.cls_token_id and tokens[0, -1] == tokenizer.sep_token_id
    full, _, _ = bridge.to_tokens(long, truncate=False)
    assert full.shape[1] > n_ctx and torch.equal(full[0, : n_ctx - 1], tokens[0, :-1])
    with pytest.raises(ValueError, match="n_ctx|longer"):  # (the forward refuses what does not fit)
        bridge(full)


def test_str_tokens_and_single_tokens_read_the_vocabulary(bert):
    """to_str_tokens: each token as the vocabulary writes it ([CLS] and [SEP] included: what the
    model sees); to_single_token: the vocabulary's id of a one-token word (no [CLS]/[SEP]);
    to_string: HF's decode; get_token_position over the same tokens."""
    _, bridge = bert
    tokenizer = bridge.tokenizer
    text = "When Mary went to Paris, the cats jumped!"
    ids = tokenizer(text)["input_ids"]
    assert bridge.to_str_tokens(text) == tokenizer.convert_ids_to_tokens(ids)
    assert bridge.to_str_tokens(text)[8:12] == ["cat", "##s", "jump", "##ed"]
    assert bridge.to_str_tokens([text, "hello"])[1] == ["[CLS]", "hello", "[SEP]"]
    assert bridge.to_str_tokens([("hello", "the cat")]) == [["[CLS]", "hello", "[SEP]", "the", "cat", "[SEP]"]]
    assert bridge.to_single_token("cat") == tokenizer.vocab["cat"] and bridge.to_single_token("[MASK]") == tokenizer.mask_token_id
    with pytest.raises(ValueError, match=r"'cats' is not a single token: it is \['cat', '##s'\]"):
        bridge.to_single_token("cats")
    assert bridge.to_string(torch.tensor(ids)) == "[CLS] when mary went to paris, the cats jumped! [SEP]"
    assert bridge.get_token_position("cat", text) == ids.index(tokenizer.vocab["cat"])
    W_U = bridge.tokens_to_residual_directions("cat")
    assert torch.equal(W_U, bridge.W_U[:, tokenizer.vocab["cat"]])


def test_predictions_equal_hfs_fill_mask_pipeline(bert):
    """The masked-LM workflow: HookedEncoder's return_type="predictions" and the top tokens and
    probabilities at a [MASK] read off the bridge's logits are HF's fill-mask pipeline's."""
    hf, bridge = bert
    tokenizer = bridge.tokenizer
    pipe = transformers.pipeline("fill-mask", model=hf, tokenizer=tokenizer, device="cpu")
    n = forward_depth(bridge.cfg, 24)
    for text in MASKED:
        expected = pipe(text, top_k=5)
        with torch.no_grad():
            logits = bridge(text)
            tokens = bridge.to_tokens(text).tokens
            reference = float64_reference(hf, tokens)
        at_mask = reference[tokens == tokenizer.mask_token_id][0]  # [d_vocab]
        top2 = at_mask.topk(2).values
        check_above((top2[0] - top2[1]).item(), 100 * rounding_bound(at_mask.abs().max().item(), torch.float32, n), "no near tie")
        assert bridge(text, return_type="predictions") == expected[0]["token_str"]
        probs = logits[tokens == tokenizer.mask_token_id][0].softmax(-1)
        top = probs.topk(5)
        assert top.indices.tolist() == [e["token"] for e in expected]
        assert_rounding_close(top.values, torch.tensor([e["score"] for e in expected]), n=n, scale=1.0, what="probabilities")
    with torch.no_grad():  # two masks in a batch: one prediction per mask, rows in order, HF's argmax
        logits = hf_on_text(hf, tokenizer, MASKED)
        tokens = bridge.to_tokens(MASKED).tokens
        best = logits[tokens == tokenizer.mask_token_id].argmax(-1)
        assert bridge(MASKED, return_type="predictions") == [f"Prediction {i}: {tokenizer.decode([t])}" for i, t in enumerate(best)]


def test_hooked_encoder_arguments_and_return_types(bert):
    """HookedEncoder's forward(input, return_type, token_type_ids, one_zero_attention_mask), by
    position and by name, equals HF; return_type=None runs the forward (hooks fire) and returns None."""
    hf, bridge = bert
    tokens, types, mask = bridge.to_tokens(PAIRS)
    with torch.no_grad():
        expected = hf_logits(hf, tokens, token_type_ids=types, attention_mask=mask)
        positional = bridge(tokens, "logits", types, mask)
        named = bridge(tokens, token_type_ids=types, one_zero_attention_mask=mask)
        seen = []
        assert bridge.run_with_hooks(PAIRS, return_type=None, fwd_hooks=[("unembed.hook_out", lambda x, hook: seen.append(x))]) is None
    assert torch.equal(positional, named)
    check(max_diff(named, expected), 1e-4 * expected.abs().max().item(), "vs HF")
    assert len(seen) == 1 and torch.equal(seen[0], named)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(PAIRS)  # (the explicit attention path: patterns are cached)
    assert_rounding_close(logits, named, n=forward_depth(bridge.cfg, tokens.shape[1]), what="run_with_cache's logits")
    assert cache["embed.hook_token_type_embed"].shape == (2, tokens.shape[1], 48)
    assert torch.equal(cache["embed.hook_token_type_embed"][0], bridge.params["bert.embeddings.token_type_embeddings.weight"][types[0]])
    assert bridge.cfg.attention_dir == "bidirectional" and bridge.cfg.default_prepend_bos is False


def test_the_tokenizer_is_used_as_given(tmp_path):
    """As HookedEncoder: no eos/bos filled in, no reload (HookedTransformer's set_tokenizer does
    both for causal LMs); from_pretrained loads the tokenizer saved beside the model."""
    hf, tokenizer = make_bert(), bert_tokenizer()
    bridge = fb.Bridge.from_hf(hf, tokenizer=tokenizer)
    assert bridge.tokenizer is tokenizer and tokenizer.eos_token is None and tokenizer.bos_token is None and len(tokenizer) == VOCAB
    loaded = fb.Bridge.from_pretrained(save_pretrained(hf, tokenizer, str(tmp_path)))
    with torch.no_grad():
        assert torch.equal(loaded(TEXTS), bridge(TEXTS))
    assert loaded.to_str_tokens(TEXTS[2]) == ["[CLS]", "hello", "world", "!", "[SEP]"]


def test_bad_text_input_is_refused_by_name(bert):
    hf, bridge = bert
    bare = fb.Bridge.from_hf(hf)
    for call in (lambda: bare("the cat"), lambda: bare.to_tokens("the cat"), lambda: bare.to_str_tokens("the cat")):
        with pytest.raises(ValueError, match="needs a tokenizer, and this Bridge has none"):
            call()
    with pytest.raises(ValueError, match="return_type='predictions' needs a tokenizer"):
        bare(bridge.to_tokens(MASKED[0]).tokens, return_type="predictions")
    no_bos = r"prepend_bos=True is not available for BertForMaskedLM, an encoder: it has no BOS token"
    for call in (lambda: bridge.to_tokens("the cat", prepend_bos=True), lambda: bridge("the cat", prepend_bos=True),
                 lambda: bridge.to_str_tokens("the cat", prepend_bos=True), lambda: bridge.run_with_cache("the cat", prepend_bos=True)):  # fmt: skip
        with pytest.raises(ValueError, match=no_bos):
            call()
    with pytest.raises(ValueError, match="default_prepend_bos=True is not available"):
        fb.Bridge.from_hf(hf, tokenizer=bert_tokenizer(), default_prepend_bos=True)
    bridge.cfg.default_prepend_bos = True
    with pytest.raises(ValueError, match="cfg.default_prepend_bos=True is not available"):
        bridge("the cat")
    bridge.cfg.default_prepend_bos = False
    left = "is not available for BertForMaskedLM, an encoder: it counts positions absolutely, padding included"
    with pytest.raises(ValueError, match="padding_side='left' " + left):
        bridge(TEXTS, padding_side="left")
    with pytest.raises(ValueError, match="default_padding_side='left' " + left):
        fb.Bridge.from_hf(hf, tokenizer=bert_tokenizer(), default_padding_side="left")
    tokenizer = bert_tokenizer()
    tokenizer.padding_side = "left"
    with pytest.raises(ValueError, match=r"tokenizer.padding_side='left' " + left):
        fb.Bridge.from_hf(hf, tokenizer=tokenizer).to_tokens(TEXTS)
    with pytest.raises(ValueError, match=r"return_type='loss' \(the next-token loss\) is for causal LMs.*fb.masked_lm_loss"):
        bridge(TEXTS, return_type="loss")
    with pytest.raises(ValueError, match="return_type='both'"):
        bridge(TEXTS, return_type="both")
    with pytest.raises(ValueError, match=r"predicts the \[MASK\] tokens, and the input has none"):
        bridge(TEXTS, return_type="predictions")
    with pytest.raises(TypeError, match=r"a string, or a non-empty list of strings or of \(text_a, text_b\) pairs"):
        bridge.to_tokens([("a", "b", "c")])
    tokens, types, mask = bridge.to_tokens(TEXTS)
    with pytest.raises(ValueError, match="pass attention_mask or one_zero_attention_mask"):
        bridge(tokens, attention_mask=mask, one_zero_attention_mask=mask)
    for text in ("the cat", TEXTS):
        with pytest.raises(NotImplementedError, match="BertForMaskedLM is not a causal decoder: it has no KV cache and cannot generate"):
            bridge.generate(text)
    with pytest.raises(ValueError, match="test_prompt is for causal LMs"):
        fb.utils.test_prompt("the cat sat on the", "mat", bridge, print_details=False)


def test_causal_models_refuse_the_encoders_arguments():
    gpt2 = fb.Bridge.from_hf(make_gpt2(vocab_size=len(gpt2_tokenizer())), tokenizer=gpt2_tokenizer())
    with pytest.raises(ValueError, match="return_type='predictions' .* is for encoders; GPT2LMHeadModel is a causal LM"):
        gpt2("the cat", return_type="predictions")
    with pytest.raises(ValueError, match="one_zero_attention_mask is HookedEncoder's argument"):
        gpt2("the cat", one_zero_attention_mask=torch.ones(1, 2, dtype=torch.long))
    assert gpt2.cfg.attention_dir == "causal"
