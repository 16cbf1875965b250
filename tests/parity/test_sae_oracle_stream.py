"""Activations for SAE training: SAELens's own ActivationsStore drawing from a Bridge gives the
activations it draws from HookedSAETransformer on the same weights; fb.sae.stream_activations
gives the same rows."""

import pytest
import torch

from functional_bridge.sae.stream import stream_activations
from helpers import random_tokens
from sae_oracle_helpers import hooked_sae_pair
from tolerance import check, forward_depth, max_abs, max_diff, rounding_bound

pytestmark = pytest.mark.oracle


def store(sae_lens, model, tokens, hook_name, d_in):
    from datasets import Dataset

    return sae_lens.ActivationsStore(
        model=model, dataset=Dataset.from_dict({"tokens": tokens.tolist()}), streaming=False, hook_name=hook_name,
        hook_head_index=None, context_size=tokens.shape[1], d_in=d_in, n_batches_in_buffer=2,
        total_training_tokens=10_000, store_batch_size_prompts=4, train_batch_size_tokens=8, prepend_bos=False,
        normalize_activations="none", device="cpu", dtype="float64",
    )  # fmt: skip


@pytest.mark.parametrize("hook_name, d_in", [("blocks.1.hook_resid_pre", 48), ("blocks.0.attn.hook_z", 48)])
def test_activations_store_draws_from_a_bridge(sae_lens, transformer_lens, hook_name, d_in):
    bridge, model = hooked_sae_pair(sae_lens, transformer_lens)
    tokens = random_tokens(8, 6, 97, seed=2)
    ours, theirs = store(sae_lens, bridge, tokens, hook_name, d_in), store(sae_lens, model, tokens, hook_name, d_in)
    batch = ours.get_batch_tokens()
    assert torch.equal(batch, theirs.get_batch_tokens())
    acts, expected = ours.get_activations(batch), theirs.get_activations(batch)
    assert acts.shape == expected.shape == (4, 6, d_in)
    bound = rounding_bound(max_abs(expected), torch.float64, forward_depth(bridge.cfg, 6))
    check(max_diff(acts, expected), bound, "ActivationsStore over the bridge")
    assert ours.next_batch().shape == (8, d_in)
    streamed = torch.cat(list(stream_activations(bridge, [batch[:2], batch[2:]], hook_name)))
    # the store keeps activations in float32 (torch.zeros' default dtype): one rounding of ours
    check(max_diff(streamed, expected.flatten(0, 1)), rounding_bound(max_abs(expected), expected.dtype), "stream_activations")
