"""Circuits, composition scores, SVDInterpreter and ActivationCache against TransformerLens 3.9
on the same GPT-2 (HookedTransformer built from the same HF weights, no processing unless said):
each model's own run. ActivationCache on shared activations, method by method, is
test_tl_oracle_activation_cache.py.

Tolerances (tests/tolerance.py): in float32 ours is no further from TransformerLens run in
float64 (the same weights) than 4x TransformerLens's float32 run is; in float64 the two agree to
float64 rounding at the values' magnitude over the computation's accumulated roundings."""

from typing import NamedTuple

import pytest
import torch

import functional_bridge as fb
from helpers import hooked_float64, make_gpt2, random_tokens
from test_tl_oracle_gpt2 import tl_config, tl_conversion
from tolerance import assert_as_accurate_as, assert_matches_oracle, assert_rounding_close, forward_depth

pytestmark = pytest.mark.oracle


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
    theirs64 = models(transformer_lens, torch.float64)[1].all_composition_scores(mode)
    assert_matches_oracle(ours, theirs, theirs64, n=bridge.cfg.d_model**2)  # Frobenius norms of d_model^2 entries
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


def tl_readout64(interpreter, vector_type, layer, n, head=None):
    """[d_vocab, 1, n]: TransformerLens's SVDInterpreter readout computed in float64 (it computes
    in float32 only): the top n right singular vectors of the matrix it decomposes, from its own
    weights, read through its W_U."""
    params = {name: value.detach().double() for name, value in interpreter.params.items()}
    if vector_type == "OV":
        matrix = params[f"blocks.{layer}.attn.W_V"][head] @ params[f"blocks.{layer}.attn.W_O"][head]
    elif vector_type == "w_in":
        matrix = params[f"blocks.{layer}.mlp.W_in"].T * params.get(f"blocks.{layer}.ln2.w", 1.0)
    else:
        matrix = params[f"blocks.{layer}.mlp.W_out"]
    return (torch.linalg.svd(matrix).Vh[:n] @ params["unembed.W_U"]).T[:, None, :]


def assert_readouts_as_accurate_as_tl(mine, tl, ref64, what=""):
    """Each vector's sign aligned to the float64 reference's (singular vectors have arbitrary
    signs), ours no further from it than 4x TransformerLens's: a vector's rounding error grows as
    the singular value gap shrinks, and the reference's distance measures it."""
    align = lambda x: x.double() * torch.sign((x.double() * ref64).sum(0, keepdim=True))  # noqa: E731
    assert_as_accurate_as(align(mine), align(tl), ref64, what=what)


def test_svd_interpreter_equals_transformer_lens(transformer_lens):
    hf = separate_ov_spectra_(make_gpt2())
    bridge, model = fb.Bridge.from_hf(hf), hooked_transformer(hf, transformer_lens)
    ours, theirs = fb.SVDInterpreter(bridge), transformer_lens.SVDInterpreter(model)
    for layer in range(3):
        for head in range(4):
            mine = ours.get_singular_vectors("OV", layer, num_vectors=8, head_index=head)
            tl = theirs.get_singular_vectors("OV", layer, num_vectors=8, head_index=head)
            assert mine.shape == tl.shape == (97, 1, 8)
            ref64 = tl_readout64(theirs, "OV", layer, 8, head)
            assert_readouts_as_accurate_as_tl(mine, tl, ref64, what=f"OV {layer}.{head}")
        for vector_type in ("w_in", "w_out"):
            mine = ours.get_singular_vectors(vector_type, layer, num_vectors=5)
            tl = theirs.get_singular_vectors(vector_type, layer, num_vectors=5)
            assert mine.shape == tl.shape == (97, 1, 5)
            ref64 = tl_readout64(theirs, vector_type, layer, 5)
            assert_readouts_as_accurate_as_tl(mine, tl, ref64, what=f"{vector_type} {layer}")


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
    assert_readouts_as_accurate_as_tl(after, tl.get_singular_vectors("w_out", 1, num_vectors=3), tl_readout64(tl, "w_out", 1, 3))
    assert equal_up_to_sign(before, after) > 1e-2


# ActivationCache: each model's own run (shared activations: test_tl_oracle_activation_cache.py)

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


class Caches(NamedTuple):
    ours: object  # ActivationCache
    tl: object  # TransformerLens's ActivationCache, same dtype
    tl64: object  # TransformerLens's in float64 (the same weights)
    tokens: torch.Tensor
    dtype: torch.dtype
    depth: int  # the forward's accumulated roundings (tolerance.forward_depth)


@pytest.fixture(scope="module", params=[torch.float32, torch.float64], ids=["float32", "float64"])
def caches(request):
    import transformer_lens

    bridge, model = models(transformer_lens, request.param)
    model64 = model if request.param == torch.float64 else models(transformer_lens, torch.float64)[1]
    tokens = random_tokens(3, 7, 97)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
        _, tl64_cache = model64.run_with_cache(tokens)
    return Caches(cache, tl_cache, tl64_cache, tokens, request.param, forward_depth(bridge.cfg, tokens.shape[1]))


CALLS = [(method, options) for method, option_list in OPTIONS.items() for options in option_list]


@pytest.mark.parametrize("method,options", CALLS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CALLS)])
def test_decompositions_equal_transformer_lens(caches, method, options):
    ours, labels = getattr(caches.ours, method)(return_labels=True, **options)
    theirs, tl_labels = getattr(caches.tl, method)(return_labels=True, **options)
    theirs64 = getattr(caches.tl64, method)(**options)
    assert labels == tl_labels
    if "bias" in labels and caches.dtype == torch.float64:
        # TransformerLens sums the biases in a float32 buffer (torch.zeros' default dtype)
        # whatever the model's dtype: that row agrees to float32 rounding of the layers' biases
        # summed; the other rows are compared at float64 precision.
        row = labels.index("bias")
        n_biases = 2 * caches.ours.model.cfg.n_layers + 1
        assert_rounding_close(ours[row], theirs[row], dtype=torch.float32, n=n_biases, what="bias row")
        ours, theirs = torch.cat([ours[:row], ours[row + 1 :]]), torch.cat([theirs[:row], theirs[row + 1 :]])
        theirs64 = theirs
    assert_matches_oracle(ours, theirs, theirs64, n=caches.depth)


def test_apply_ln_logit_attrs_and_stack_activation_equal_transformer_lens(caches):
    tokens = caches.tokens
    stacks = {id(c): c.decompose_resid() for c in caches[:3]}  # [n, batch, pos, d_model]

    def close(f, what=""):
        """f(cache, its decompose_resid stack) for ours, TransformerLens's and its float64 run."""
        assert_matches_oracle(*(f(c, stacks[id(c)]) for c in caches[:3]), n=caches.depth, what=what)

    for layer, mlp_input in ((None, False), (1, True), (2, False), (0, False)):
        close(lambda c, stack: c.apply_ln_to_stack(stack, layer, mlp_input), f"apply_ln_to_stack {layer} {mlp_input}")
    close(lambda c, stack: c.apply_ln_to_stack(stack, pos_slice=None, batch_slice=(1, 3)), "batch_slice")  # slices the stack too
    close(lambda c, stack: c.apply_ln_to_stack(stack, recompute_ln=True), "recompute_ln")
    next_tokens = torch.roll(tokens, -1, dims=1)
    for correct, incorrect in ((next_tokens, None), (next_tokens, tokens), (5, None), (torch.tensor(5), 7)):
        close(lambda c, stack: c.logit_attrs(stack, correct, incorrect_tokens=incorrect), "logit_attrs")
    close(lambda c, _: c.logit_attrs(c.decompose_resid(pos_slice=-1), next_tokens[:, -1], tokens[:, -1], pos_slice=-1), "last")
    with pytest.raises(ValueError, match="same shape"):
        caches.ours.logit_attrs(stacks[id(caches.ours)], next_tokens, 3)
    for args in (("pattern",), ("resid_pre", 2), ("scale", -1, "ln2"), ("z", 1)):
        close(lambda c, _: c.stack_activation(*args), str(args))


def test_keys_shorthands_and_batch_removal_equal_transformer_lens(transformer_lens):
    bridge, model = models(transformer_lens)
    tokens = random_tokens(1, 6, 97)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
        _, tl64_cache = models(transformer_lens, torch.float64)[1].run_with_cache(tokens)
    assert list(cache.keys()) == list(tl_cache.keys()) and len(cache) == len(tl_cache)
    for key in ("k1", ("pattern", 0), ("resid_post", -1), ("scale", 2, "ln2"), "scale", "embed", ("normalized", 1, "ln1")):
        assert torch.equal(cache[key] == cache[key], tl_cache[key] == tl_cache[key])  # same hook picked
        assert_as_accurate_as(cache[key], tl_cache[key], tl64_cache[key], what=str(key))
    single, tl_single, tl64_single = cache.remove_batch_dim(), tl_cache.remove_batch_dim(), tl64_cache.remove_batch_dim()
    assert single is cache and not cache.has_batch_dim  # in place, as TL's
    assert {k: v.shape for k, v in single.items()} == {k: v.shape for k, v in tl_single.items()}
    for method, options in [
        ("accumulated_resid", {"apply_ln": True}), ("accumulated_resid", {"layer": 2, "apply_ln": True, "incl_mid": True}),
        ("decompose_resid", {"apply_ln": True, "pos_slice": -1}), ("stack_head_results", {"apply_ln": True}),
        ("get_full_resid_decomposition", {"apply_ln": True, "expand_neurons": False}),
    ]:  # fmt: skip
        ours, theirs, theirs64 = (getattr(c, method)(**options) for c in (single, tl_single, tl64_single))
        assert_as_accurate_as(ours, theirs, theirs64, what=method)
    attrs = (c.logit_attrs(c.decompose_resid(), tokens[0], has_batch_dim=False) for c in (single, tl_single, tl64_single))
    assert_as_accurate_as(*attrs, what="logit_attrs")


def test_processed_bridge_analyses_equal_processed_hooked_transformer(transformer_lens):
    """bridge.processed() (fold_ln, centring, value biases: TL's defaults) against a
    HookedTransformer processed alike, whose norms become LNPre: the identity-weighted norms the
    processed bridge keeps give the same centring, scaling and logit lens."""
    hf = make_gpt2()
    model = transformer_lens.HookedTransformer(tl_config(hf, transformer_lens))
    model.load_and_process_state_dict(dict(tl_conversion(hf, transformer_lens)))  # TL's default processing
    assert model.cfg.normalization_type == "LNPre"
    model64 = hooked_float64(model)
    bridge = fb.Bridge.from_hf(hf).processed()
    tokens = random_tokens(2, 6, 97)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
        _, tl64_cache = model64.run_with_cache(tokens)
    caches = (cache, tl_cache, tl64_cache)
    for method in ("accumulated_resid", "decompose_resid", "stack_head_results", "get_full_resid_decomposition"):
        assert_as_accurate_as(*(getattr(c, method)(apply_ln=True) for c in caches), what=method)
    assert_as_accurate_as(*(c.logit_attrs(c.decompose_resid(), tokens) for c in caches), what="logit_attrs")
    for mode in "QKV":
        ours, theirs, theirs64 = (m.all_composition_scores(mode) for m in (bridge, model, model64))
        assert_as_accurate_as(ours, theirs, theirs64, what=f"composition {mode}")
    ours, theirs = fb.SVDInterpreter(bridge), transformer_lens.SVDInterpreter(model)
    for vector_type in ("w_in", "w_out"):  # TL skips ln2.w once folded; ours multiplies by its 1s
        mine, tl = ours.get_singular_vectors(vector_type, 1, 4), theirs.get_singular_vectors(vector_type, 1, 4)
        assert_readouts_as_accurate_as_tl(mine, tl, tl_readout64(theirs, vector_type, 1, 4), what=vector_type)
