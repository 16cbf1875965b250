"""Circuits, composition scores, SVDInterpreter and a processed bridge's ActivationCache against
TransformerLens 3.9 on the same GPT-2 (HookedTransformer built from the same HF weights, no
processing unless said)."""

import pytest
import torch

import functional_bridge as fb
from helpers import make_gpt2, random_tokens
from test_tl_oracle_gpt2 import tl_config, tl_conversion

pytestmark = pytest.mark.oracle

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}  # relative to the oracle's largest entry


def hooked_transformer(hf, transformer_lens):
    """HookedTransformer in the HF model's dtype, from the same weights, no processing."""
    cfg = tl_config(hf, transformer_lens)
    cfg.dtype = hf.dtype
    model = transformer_lens.HookedTransformer(cfg)
    state = dict(tl_conversion(hf, transformer_lens))
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()


def rel(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    if not b.numel():
        return 0.0
    scale = b.double().abs().max().clamp_min(1e-30)
    return ((a.double() - b.double()).abs().max() / scale).item()


def models(transformer_lens, dtype=torch.float32, **overrides):
    hf = make_gpt2(**overrides).to(dtype)
    return fb.Bridge.from_hf(hf), hooked_transformer(hf, transformer_lens)


# circuits and composition -------------------------------------------------------------------


def test_qk_and_ov_equal_hooked_transformer(transformer_lens):
    bridge, model = models(transformer_lens)
    for ours, theirs in ((bridge.QK, model.QK), (bridge.OV, model.OV)):
        assert ours.shape == theirs.shape == (3, 4, 48, 48)
        assert torch.equal(ours.A, theirs.A) and torch.equal(ours.B, theirs.B)
        assert torch.equal(ours.AB, theirs.AB)
    assert torch.equal(fb.analysis.qk_circuit(bridge.params, bridge.cfg).AB, model.QK.AB)
    assert torch.equal(fb.analysis.ov_circuit(bridge.params, bridge.cfg).AB, model.OV.AB)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_all_composition_scores_equal_hooked_transformer(transformer_lens, mode, dtype):
    bridge, model = models(transformer_lens, dtype)
    ours, theirs = bridge.all_composition_scores(mode), model.all_composition_scores(mode)
    assert ours.shape == theirs.shape == (3, 4, 3, 4)
    assert torch.equal(ours == 0, theirs == 0)  # the same pairs masked
    assert rel(ours, theirs) <= TOLERANCE[dtype]
    pure = fb.analysis.all_composition_scores(bridge.params, bridge.cfg, mode)
    assert torch.equal(pure, ours)


# SVD interpreter ----------------------------------------------------------------------------


@torch.no_grad()
def separate_ov_spectra_(hf, seed=0):
    """Give every head's W_V W_O singular values 2 * 0.7^i, so that each singular vector is well
    determined in float32 (TL's SVDInterpreter computes in float32 only) and vectors can be
    compared one by one, up to sign."""
    gen = torch.Generator().manual_seed(seed)
    d_model, n_heads = hf.config.n_embd, hf.config.n_head
    d_head = d_model // n_heads
    spectrum = 2 * 0.7 ** torch.arange(d_head, dtype=torch.float64)
    for block in hf.transformer.h:
        for head in range(n_heads):
            left = torch.linalg.qr(torch.randn(d_model, d_head, generator=gen, dtype=torch.float64))[0]
            right = torch.linalg.qr(torch.randn(d_model, d_head, generator=gen, dtype=torch.float64))[0]
            columns = slice(2 * d_model + head * d_head, 2 * d_model + (head + 1) * d_head)
            block.attn.c_attn.weight[:, columns] = (left * spectrum).to(hf.dtype)  # W_V [d_model, d_head]
            block.attn.c_proj.weight[head * d_head : (head + 1) * d_head] = right.T.to(hf.dtype)  # W_O
    return hf


def equal_up_to_sign(ours, theirs) -> float:
    """Relative difference of [d_vocab, 1, n] readouts after aligning each vector's sign."""
    sign = torch.sign((ours * theirs).sum(0, keepdim=True))
    return rel(ours * sign, theirs)


def test_svd_interpreter_equals_transformer_lens(transformer_lens):
    hf = separate_ov_spectra_(make_gpt2())
    bridge, model = fb.Bridge.from_hf(hf), hooked_transformer(hf, transformer_lens)
    ours, theirs = fb.SVDInterpreter(bridge), transformer_lens.SVDInterpreter(model)
    for layer in range(3):
        for head in range(4):
            mine = ours.get_singular_vectors("OV", layer, num_vectors=8, head_index=head)
            tl = theirs.get_singular_vectors("OV", layer, num_vectors=8, head_index=head)
            assert mine.shape == tl.shape == (97, 1, 8)
            assert equal_up_to_sign(mine, tl) <= 1e-5
        for vector_type in ("w_in", "w_out"):
            mine = ours.get_singular_vectors(vector_type, layer, num_vectors=5)
            tl = theirs.get_singular_vectors(vector_type, layer, num_vectors=5)
            assert mine.shape == tl.shape == (97, 1, 5)
            assert equal_up_to_sign(mine, tl) <= 1e-5


def test_svd_interpreter_is_never_stale(transformer_lens):
    """An edit of the leaves after the interpreter is made shows in its next answer, as in a
    TransformerLens interpreter built on the edited model."""
    hf = separate_ov_spectra_(make_gpt2())
    bridge = fb.Bridge.from_hf(hf)
    interpreter = fb.SVDInterpreter(bridge)
    before = interpreter.get_singular_vectors("w_out", 1, num_vectors=3)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_proj.weight[:, :5] *= 3
        hf.transformer.wte.weight[:10] *= -2  # the (tied) unembedding too
    after = interpreter.get_singular_vectors("w_out", 1, num_vectors=3)
    tl = transformer_lens.SVDInterpreter(hooked_transformer(hf, transformer_lens))
    assert equal_up_to_sign(after, tl.get_singular_vectors("w_out", 1, num_vectors=3)) <= 1e-5
    assert equal_up_to_sign(before, after) > 1e-2


# ActivationCache (the rest: test_tl_oracle_activation_cache.py) ----------------------------


def test_processed_bridge_analyses_equal_processed_hooked_transformer(transformer_lens):
    """bridge.processed() (fold_ln, centring, value biases: TL's defaults) against a
    HookedTransformer processed alike, whose norms become LNPre: the identity-weighted norms the
    processed bridge keeps give the same centring, scaling and logit lens."""
    hf = make_gpt2()
    model = transformer_lens.HookedTransformer(tl_config(hf, transformer_lens))
    model.load_and_process_state_dict(dict(tl_conversion(hf, transformer_lens)))  # TL's default processing
    assert model.cfg.normalization_type == "LNPre"
    bridge = fb.Bridge.from_hf(hf).processed()
    tokens = random_tokens(2, 6, 97)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
    for method in ("accumulated_resid", "decompose_resid", "stack_head_results", "get_full_resid_decomposition"):
        assert rel(getattr(cache, method)(apply_ln=True), getattr(tl_cache, method)(apply_ln=True)) <= 1e-5, method
    stack, tl_stack = cache.decompose_resid(), tl_cache.decompose_resid()
    assert rel(cache.logit_attrs(stack, tokens), tl_cache.logit_attrs(tl_stack, tokens)) <= 1e-5
    for mode in "QKV":
        assert rel(bridge.all_composition_scores(mode), model.all_composition_scores(mode)) <= 1e-5
    ours, theirs = fb.SVDInterpreter(bridge), transformer_lens.SVDInterpreter(model)
    for vector_type in ("w_in", "w_out"):  # TL skips ln2.w once folded; ours multiplies by its 1s
        mine, tl = ours.get_singular_vectors(vector_type, 1, 4), theirs.get_singular_vectors(vector_type, 1, 4)
        assert equal_up_to_sign(mine, tl) <= 1e-5
