"""Processing and the TL round trip over the rotary families' harder variants (grouped-query
attention, windows, q/k norms, partial rotary, missing or present biases, tied heads), with
HF's forward as the oracle (and HF in float64 as the reference its rounding is measured against)."""

import pytest
import torch

import functional_bridge as fb
from functional_bridge.architectures import family_for
from family_helpers import ALL_VARIANTS, assert_equal_or_rounded, make_family, rounded_leaves
from helpers import random_tokens
from tolerance import assert_as_accurate_as, float64_copy

OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
COMBOS = [dict.fromkeys(OPTIONS, True)] + [{option: option == name for option in OPTIONS} for name in OPTIONS]


@pytest.mark.parametrize("family,variant", ALL_VARIANTS)
def test_processing_keeps_hf_log_probs_and_round_trips(family, variant):
    hf = make_family(family, variant)
    bridge = fb.Bridge.from_hf(hf)
    cfg = bridge.cfg
    tokens = random_tokens(2, 12, cfg.d_vocab)
    with torch.no_grad():
        expected, expected64 = hf(tokens).logits.log_softmax(-1), float64_copy(hf)(tokens).logits.log_softmax(-1)
        for options in COMBOS:
            processed = bridge.processed(**options)
            assert_as_accurate_as(processed(tokens).log_softmax(-1), expected, expected64, what=str(options))
    params = fb.process_weights(bridge.params, cfg)
    extras = [name for name in params if name in family_for(cfg).extra_param_shapes(cfg)]
    rebuilt = family_for(cfg).hf_from_tl(fb.tl_weights(params, cfg), cfg, extras)
    assert_equal_or_rounded(rebuilt, params, rounded_leaves(cfg, extras))
