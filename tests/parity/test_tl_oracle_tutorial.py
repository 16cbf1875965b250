"""The tutorial in tl_tutorial.py, run on HookedTransformer 3.9 and on a Bridge loaded from the
same saved directory (HF weights and a locally trained tokenizer): every number it produces is
equal.

Unprocessed, in float64: both compute the same float64 function and differ by summation order
only, so each quantity is bounded by rounding (of the coarser dtype: float64, or float32 where
the tutorial or TL stores a quantity in float32) at its magnitude over the forward's depth
(tests/tolerance.py). Processed (the weights HookedTransformer.from_pretrained gives: fold_ln,
centring, value-bias folding; the Bridge's enable_compatibility_mode), in float32, as notebooks
run: each quantity no further from TransformerLens's float64 run than 4x TransformerLens's own
float32 run is (tolerance.assert_as_accurate_as).
"""

import dataclasses

import pytest
import torch
import transformers

import functional_bridge as fb
from family_helpers import make_family
from helpers import make_gpt2
from test_tl_oracle_facade import tl_default_prepend_bos
from test_tl_oracle_processing import CONVERSIONS, hooked_config
from tl_tutorial import run_tutorial
from tokenizers_local import gpt2_tokenizer, llama_tokenizer, save_pretrained
from tolerance import assert_as_accurate_as, assert_rounding_close, forward_depth

pytestmark = pytest.mark.oracle

PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
NO_PROCESSING = dict.fromkeys(PROCESSING, False)


def saved_model(family: str) -> tuple[str, torch.nn.Module]:
    if family == "gpt2":
        tokenizer = gpt2_tokenizer()
        hf = make_gpt2(vocab_size=len(tokenizer), n_positions=64)
    else:
        tokenizer = llama_tokenizer()
        hf = make_family(family, vocab_size=len(tokenizer))
    return save_pretrained(hf, tokenizer), hf


def load_hooked_transformer(path: str, hf, transformer_lens, dtype: torch.dtype, processing: dict):
    """HookedTransformer as from_pretrained would build it from this directory, offline: TL's
    config fields and conversion for the HF class, its processing, the saved tokenizer. Rotary
    tables built at construction are put back after loading (TL 3.9 round-trips float64 state
    through float32 when it loads)."""
    from transformer_lens.pretrained import weight_conversions

    cfg = fb.config_from_hf(hf.config)
    tl_cfg = hooked_config(cfg, transformer_lens)
    tl_cfg.dtype = dtype
    model = transformer_lens.HookedTransformer(tl_cfg)
    tables = {name: buffer.clone() for name, buffer in model.named_buffers() if "rotary" in name}
    convert = getattr(weight_conversions, CONVERSIONS[cfg.original_architecture])
    model.load_and_process_state_dict(dict(convert(hf.to(dtype), model.cfg)), **processing)
    for name, table in tables.items():
        module, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(module), leaf, table)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(path))
    model.cfg.default_prepend_bos = tl_default_prepend_bos(path, hf)
    return model.eval()


def tl_utils():
    """``from transformer_lens import utils``, the import the tutorial's TL run uses."""
    from transformer_lens import utils

    return utils


def compare(ours: dict, theirs: dict, assert_close) -> None:
    """Lists (labels, string tokens) equal; tensors of the same shape within assert_close."""
    assert ours.keys() == theirs.keys()
    for key, expected in theirs.items():
        got = ours[key]
        if isinstance(expected, list):
            assert got == expected, key
            continue
        assert got.shape == expected.shape, key
        assert_close(key, got, expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tutorial_gives_hooked_transformers_numbers_unprocessed(transformer_lens, family):
    path, hf = saved_model(family)
    theirs = run_tutorial(load_hooked_transformer(path, hf, transformer_lens, torch.float64, NO_PROCESSING), tl_utils())
    bridge = fb.Bridge.from_pretrained(path, dtype=torch.float64)
    ours = run_tutorial(bridge, fb.utils)
    # TL's accumulated_bias sums into a float32 zeros tensor whatever the model's dtype (so it is
    # held to float32 rounding); the patching table is a float32 tensor in the tutorial itself
    assert theirs["accumulated_bias"].dtype == torch.float32 and ours["accumulated_bias"].dtype == torch.float64
    n = forward_depth(bridge.cfg, ours["logits"].shape[1])
    compare(ours, theirs, lambda key, got, expected: assert_rounding_close(got, expected, n=n, what=key))
    assert theirs["patching"].abs().max() > 0 and (theirs["patching"][0] != theirs["patching"][0, 0]).any()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tutorial_gives_hooked_transformers_numbers_processed(transformer_lens, family):
    path, hf = saved_model(family)
    theirs = run_tutorial(load_hooked_transformer(path, hf, transformer_lens, torch.float32, PROCESSING), tl_utils())
    reference = run_tutorial(load_hooked_transformer(path, hf, transformer_lens, torch.float64, PROCESSING), tl_utils())
    model = fb.Bridge.from_pretrained(path)
    model.enable_compatibility_mode()
    ours = run_tutorial(model, fb.utils)
    compare(ours, theirs, lambda key, got, expected: assert_as_accurate_as(got, expected, reference[key], what=key))
