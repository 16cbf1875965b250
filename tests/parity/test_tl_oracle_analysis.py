"""Circuits, composition scores, SVDInterpreter and ActivationCache against TransformerLens 3.9
on the same GPT-2 (HookedTransformer built from the same HF weights, no processing)."""

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


# ActivationCache ----------------------------------------------------------------------------

OPTIONS = {
    "accumulated_resid": [
        {}, {"layer": 2, "incl_mid": True}, {"apply_ln": True}, {"layer": 1, "apply_ln": True, "mlp_input": True},
        {"apply_ln": True, "pos_slice": -1}, {"pos_slice": (1, 4), "incl_mid": True}, {"layer": 0},
        {"layer": 2, "apply_ln": True, "incl_mid": True, "pos_slice": [0, 5]},
    ],
    "decompose_resid": [
        {}, {"layer": 2, "mlp_input": True, "apply_ln": True}, {"mode": "attn", "apply_ln": True, "pos_slice": [0, 3]},
        {"mode": "mlp", "incl_embeds": False}, {"layer": 0, "mlp_input": True}, {"apply_ln": True, "pos_slice": -1},
    ],
    "stack_head_results": [
        {}, {"layer": 2, "apply_ln": True}, {"incl_remainder": True, "pos_slice": 2}, {"layer": 0},
        {"layer": 1, "incl_remainder": True, "apply_ln": True}, {"apply_ln": True, "pos_slice": (2, 6)},
    ],
    "get_full_resid_decomposition": [
        {}, {"layer": 2, "mlp_input": True, "apply_ln": True}, {"expand_neurons": False, "apply_ln": True, "pos_slice": -1},
        {"layer": 0}, {"layer": 0, "mlp_input": True, "expand_neurons": False}, {"layer": 1, "apply_ln": True},
    ],
    "stack_neuron_results": [
        {"layer": 2}, {"layer": 3, "apply_ln": True, "pos_slice": -1}, {"layer": 1, "neuron_slice": (10, 20), "incl_remainder": True},
    ],
}  # fmt: skip


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def caches(request):
    import transformer_lens

    bridge, model = models(transformer_lens, request.param)
    tokens = random_tokens(3, 7, 97)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
    return cache, tl_cache, tokens, request.param


CALLS = [(method, options) for method, option_list in OPTIONS.items() for options in option_list]


@pytest.mark.parametrize("method,options", CALLS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CALLS)])
def test_decompositions_equal_transformer_lens(caches, method, options):
    cache, tl_cache, _, dtype = caches
    ours, labels = getattr(cache, method)(return_labels=True, **options)
    theirs, tl_labels = getattr(tl_cache, method)(return_labels=True, **options)
    assert labels == tl_labels
    if "bias" in labels and dtype == torch.float64:
        # TransformerLens sums the biases in a float32 buffer (torch.zeros' default dtype)
        # whatever the model's dtype; the other rows are compared at float64 precision.
        row = labels.index("bias")
        assert rel(ours[row], theirs[row]) <= 1e-6
        ours, theirs = torch.cat([ours[:row], ours[row + 1 :]]), torch.cat([theirs[:row], theirs[row + 1 :]])
    assert rel(ours, theirs) <= TOLERANCE[dtype]


def test_apply_ln_logit_attrs_and_stack_activation_equal_transformer_lens(caches):
    cache, tl_cache, tokens, dtype = caches
    tol = TOLERANCE[dtype]
    stack, tl_stack = cache.decompose_resid(), tl_cache.decompose_resid()  # [n, batch, pos, d_model]
    for layer, mlp_input in ((None, False), (1, True), (2, False), (0, False)):
        assert rel(cache.apply_ln_to_stack(stack, layer, mlp_input), tl_cache.apply_ln_to_stack(tl_stack, layer, mlp_input)) <= tol
    assert rel(
        cache.apply_ln_to_stack(stack, pos_slice=None, batch_slice=(1, 3)),  # slices the stack too
        tl_cache.apply_ln_to_stack(tl_stack, pos_slice=None, batch_slice=(1, 3)),
    ) <= tol  # fmt: skip
    assert rel(cache.apply_ln_to_stack(stack, recompute_ln=True), tl_cache.apply_ln_to_stack(tl_stack, recompute_ln=True)) <= tol
    next_tokens = torch.roll(tokens, -1, dims=1)
    for correct, incorrect in ((next_tokens, None), (next_tokens, tokens), (5, None), (torch.tensor(5), 7)):
        ours = cache.logit_attrs(stack, correct, incorrect_tokens=incorrect)
        theirs = tl_cache.logit_attrs(tl_stack, correct, incorrect_tokens=incorrect)
        assert rel(ours, theirs) <= tol
    last, tl_last = cache.decompose_resid(pos_slice=-1), tl_cache.decompose_resid(pos_slice=-1)  # [n, batch, d_model]
    ours = cache.logit_attrs(last, next_tokens[:, -1], tokens[:, -1], pos_slice=-1)
    assert rel(ours, tl_cache.logit_attrs(tl_last, next_tokens[:, -1], tokens[:, -1], pos_slice=-1)) <= tol
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, next_tokens, 3)
    for args in (("pattern",), ("resid_pre", 2), ("scale", -1, "ln2"), ("z", 1)):
        assert rel(cache.stack_activation(*args), tl_cache.stack_activation(*args)) <= tol


def test_keys_shorthands_and_batch_removal_equal_transformer_lens(transformer_lens):
    bridge, model = models(transformer_lens)
    tokens = random_tokens(1, 6, 97)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
    assert list(cache.keys()) == list(tl_cache.keys()) and len(cache) == len(tl_cache)
    for key in ("k1", ("pattern", 0), ("resid_post", -1), ("scale", 2, "ln2"), "scale", "embed", ("normalized", 1, "ln1")):
        assert torch.equal(cache[key] == cache[key], tl_cache[key] == tl_cache[key])  # same hook picked
        assert rel(cache[key], tl_cache[key]) <= 1e-5
    single, tl_single = cache.remove_batch_dim(), tl_cache.remove_batch_dim()
    assert not single.has_batch_dim and cache.has_batch_dim  # a new cache; TL edits its own
    assert {k: v.shape for k, v in single.items()} == {k: v.shape for k, v in tl_single.items()}
    for method, options in [
        ("accumulated_resid", {"apply_ln": True}), ("accumulated_resid", {"layer": 2, "apply_ln": True, "incl_mid": True}),
        ("decompose_resid", {"apply_ln": True, "pos_slice": -1}), ("stack_head_results", {"apply_ln": True}),
        ("get_full_resid_decomposition", {"apply_ln": True, "expand_neurons": False}),
    ]:  # fmt: skip
        assert rel(getattr(single, method)(**options), getattr(tl_single, method)(**options)) <= 1e-5
    stack, tl_stack = single.decompose_resid(), tl_single.decompose_resid()  # [n, pos, d_model]
    ours = single.logit_attrs(stack, tokens[0], has_batch_dim=False)
    assert rel(ours, tl_single.logit_attrs(tl_stack, tokens[0], has_batch_dim=False)) <= 1e-5


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
