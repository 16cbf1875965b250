"""Greedy generation against TransformerLens 3.9's HookedTransformer.generate on the same GPT-2
weights (no processing): the same tokens, ours with and without the KV cache, against TL's loop
without its KV cache (TL 3.9's cached steps add the cache's length to positions already counted
over the whole sequence: GPT-2's learned positions land wrong, and its logits differ from its own
uncached loop by ~0.04 on this model; greedy tokens happened to agree)."""

import pytest
import torch

import functional_bridge as fb
from helpers import make_gpt2
from test_tl_oracle_analysis import hooked_transformer

pytestmark = pytest.mark.oracle


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_equals_transformer_lens_generate(transformer_lens, use_cache):
    hf = make_gpt2()
    bridge, model = fb.Bridge.from_hf(hf), hooked_transformer(hf, transformer_lens)
    tokens = torch.randint(0, bridge.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    theirs = model.generate(tokens, use_past_kv_cache=False, **kwargs)  # TL's cached steps misplace positions: below
    assert torch.equal(bridge.generate(tokens, use_past_kv_cache=use_cache, **kwargs), theirs)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_from_embeddings_equals_transformer_lens(transformer_lens, use_cache):
    """TL's generate(input=model.embed(tokens)): the new tokens only ('tokens'), and the prompt's
    embeddings followed by the new tokens' ('input'); ours takes the same embeddings. TL's side
    runs without its KV cache, whose cached steps misplace GPT-2's learned positions (its
    get_residual offsets positions already counted over the whole sequence; logits differ from
    its own uncached loop by ~0.04 on this model)."""
    hf = make_gpt2()
    bridge, model = fb.Bridge.from_hf(hf), hooked_transformer(hf, transformer_lens)
    tokens = torch.randint(0, bridge.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = model.embed(tokens)  # [batch, pos, d_model]
    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    theirs = model.generate(embeds, return_type="tokens", use_past_kv_cache=False, **kwargs)
    ours = bridge.generate(embeds, return_type="tokens", use_past_kv_cache=use_cache, **kwargs)
    assert ours.shape == (2, 8) and torch.equal(ours, theirs)
    theirs_embeds = model.generate(embeds, use_past_kv_cache=False, **kwargs)
    ours_embeds = bridge.generate(embeds, use_past_kv_cache=use_cache, **kwargs)
    assert ours_embeds.shape == (2, 13, bridge.cfg.d_model) and torch.equal(ours_embeds, theirs_embeds)
