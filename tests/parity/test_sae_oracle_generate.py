"""Generation with an SAE spliced in, against SAELens 6.54's HookedSAETransformer.generate (TL 3.9's
loop) over the same float64 GPT-2: with and without the error term, a feature-ablation hook on
the SAE's features acting on every step. Ours with and without the KV cache against TL's loop
without it: TL 3.9's KV-cached generate misplaces learned positions (GPT-2) after the first step
(get_residual adds pos_offset to positions already counted from 0 over the whole sequence; its
logits then differ from its own uncached loop by ~0.04 here). A loop of run_with_saes is the
oracle for the KV-cached steps in test_generate.py."""

import pytest
import torch

import functional_bridge.sae as fbsae
from helpers import random_tokens
from sae_oracle_helpers import hooked_sae_pair, make_sae

pytestmark = pytest.mark.oracle

FEATURES = "blocks.1.hook_resid_pre.hook_sae_acts_post"


def _ablate(acts, hook):
    acts = acts.clone()
    acts[..., :48] = 0
    return acts


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
@pytest.mark.parametrize("use_error_term", [False, True])
def test_generate_with_an_sae_equals_hooked_sae_transformer(sae_lens, transformer_lens, use_error_term, use_cache):
    bridge, model = hooked_sae_pair(sae_lens, transformer_lens)
    sae = make_sae("standard@resid_pre")
    tokens = random_tokens(2, 6, 97, seed=4)
    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    model.add_sae(fbsae.to_sae_lens(sae), use_error_term=use_error_term)
    with model.hooks(fwd_hooks=[(FEATURES, _ablate)]):
        theirs = model.generate(tokens, use_past_kv_cache=False, **kwargs)
    theirs_plain = model.generate(tokens, use_past_kv_cache=False, **kwargs)
    kwargs["use_past_kv_cache"] = use_cache
    model.reset_saes()
    with bridge.saes([sae], use_error_term=use_error_term):
        ours = bridge.generate(tokens, fwd_hooks=[(FEATURES, _ablate)], **kwargs)
        ours_plain = bridge.generate(tokens, **kwargs)
    assert torch.equal(ours, theirs) and torch.equal(ours_plain, theirs_plain)
    assert not torch.equal(ours, ours_plain)  # the ablation shows through (with the error term too)
    if use_error_term:  # the error term restores the model: without the hook, generation is the plain model's
        assert torch.equal(ours_plain, bridge.generate(tokens, **kwargs))
