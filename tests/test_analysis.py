"""QK/OV circuits, composition scores and the SVD interpreter against dense float64 matrix
computations on the TL weights, for every registered family (grouped-query ones included).
Tolerances: float64 rounding at the values' magnitude (tests/tolerance.py), singular vectors
that over their singular value gaps."""

import pytest
import torch

import functional_bridge as fb
from helpers import make_gpt2
from tiny_models import architectures, tiny_model
from tolerance import assert_rounding_close, check, max_diff, rounding_bound, singular_vector_bound


@pytest.mark.parametrize("architecture", architectures())
def test_circuits_are_the_dense_per_head_products(architecture):
    bridge = fb.Bridge.from_hf(tiny_model(architecture).double())
    cfg, tl = bridge.cfg, bridge.tl_parameters()
    QK, OV = bridge.QK, bridge.OV
    assert QK.shape == OV.shape == (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_model)
    for layer in range(cfg.n_layers):
        W_Q, W_O = tl[f"blocks.{layer}.attn.W_Q"], tl[f"blocks.{layer}.attn.W_O"]
        # grouped-query families store each key/value head once (TL's _W_K): it serves
        # n_heads // n_kv_heads consecutive query heads
        grouped = f"blocks.{layer}.attn._W_K" in tl
        W_K = tl[f"blocks.{layer}.attn._W_K" if grouped else f"blocks.{layer}.attn.W_K"]
        W_V = tl[f"blocks.{layer}.attn._W_V" if grouped else f"blocks.{layer}.attn.W_V"]
        group_here = cfg.n_heads // cfg.n_kv_heads if grouped else 1
        for head in range(cfg.n_heads):
            kv = head // group_here
            # a batched and a single matmul may take different kernels: equal to the rounding of
            # a d_head-long dot product
            assert_rounding_close(QK.AB[layer, head], W_Q[head] @ W_K[kv].T, n=cfg.d_head, what=f"QK {layer}.{head}")
            assert_rounding_close(OV.AB[layer, head], W_V[kv] @ W_O[head], n=cfg.d_head, what=f"OV {layer}.{head}")
    assert torch.equal(fb.analysis.qk_circuit(bridge.params, cfg).AB, QK.AB)
    assert torch.equal(fb.analysis.ov_circuit(bridge.params, cfg).AB, OV.AB)


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_all_composition_scores_are_dense_frobenius_ratios(mode):
    bridge = fb.Bridge.from_hf(make_gpt2().double())
    scores = bridge.all_composition_scores(mode)  # [layer, head, layer, head]
    OV, QK = bridge.OV.AB, bridge.QK.AB  # [layer, head, d_model, d_model]
    right = {"Q": QK, "K": QK.mT, "V": OV}[mode]
    fro = torch.linalg.matrix_norm
    n_layers, n_heads = OV.shape[:2]
    for l1 in range(n_layers):
        for l2 in range(n_layers):
            for h1 in range(n_heads):
                for h2 in range(n_heads):
                    expected = fro(OV[l1, h1] @ right[l2, h2]) / (fro(OV[l1, h1]) * fro(right[l2, h2]))
                    if l1 < l2:  # a product's d_model-long dot products, then d_model^2 squares summed
                        bound = rounding_bound(expected.item(), torch.float64, 2 * 48**2)
                        check(abs(scores[l1, h1, l2, h2] - expected).item(), bound)
                    else:
                        assert scores[l1, h1, l2, h2] == 0
    with pytest.raises(ValueError, match="mode"):
        bridge.all_composition_scores("O")


def test_svd_interpreter_vectors_are_the_dense_singular_vectors():
    """Each vector equals the dense SVD's up to sign; QK_query/QK_key are the left/right singular
    vectors of W_Q W_K^T; readouts go through W_U (or W_E^T); top_tokens are the readout's top-k."""
    hf = make_gpt2().double()
    bridge = fb.Bridge.from_hf(hf)
    interpreter = fb.SVDInterpreter(bridge)
    tl = bridge.tl_parameters()
    W_U, W_E = tl["unembed.W_U"], tl["embed.W_E"]

    def assert_same_up_to_sign(rows, dense_rows, S, what):
        """Unit vectors; each side turned by at most singular_vector_bound (an SVD's error bound:
        p(dims) eps ||A||, with sqrt(n) = d_model + d_mlp here, over the singular gap)."""
        sign = torch.sign((rows * dense_rows).sum(-1, keepdim=True))
        check(max_diff(rows * sign, dense_rows), 2 * singular_vector_bound(S, torch.float64, (48 + 80) ** 2, k=n), what)

    layer, head, n = 1, 2, 4
    U, S, Vh = torch.linalg.svd(bridge.QK.AB[layer, head])
    assert_same_up_to_sign(interpreter.singular_directions("QK_query", layer, n, head), U[:, :n].T, S, "QK_query")
    assert_same_up_to_sign(interpreter.singular_directions("QK_key", layer, n, head), Vh[:n], S, "QK_key")
    U, S, Vh = torch.linalg.svd(bridge.OV.AB[layer, head])
    ov = interpreter.singular_directions("OV", layer, n, head)
    assert_same_up_to_sign(ov, Vh[:n], S, "OV")
    readout = interpreter.get_singular_vectors("OV", layer, n, head)  # [d_vocab, 1, n]
    assert readout.shape == (97, 1, n)
    assert_rounding_close(readout[:, 0].T, ov @ W_U, n=48, what="readout")
    assert_rounding_close(interpreter.get_singular_vectors("OV", layer, n, head, through="W_E")[:, 0].T, ov @ W_E.T, n=48)
    w_in = tl[f"blocks.{layer}.mlp.W_in"].T * tl[f"blocks.{layer}.ln2.w"]
    _, S, Vh = torch.linalg.svd(w_in)
    assert_same_up_to_sign(interpreter.singular_directions("w_in", layer, n), Vh[:n], S, "w_in")
    _, S, Vh = torch.linalg.svd(tl[f"blocks.{layer}.mlp.W_out"])
    assert_same_up_to_sign(interpreter.singular_directions("w_out", layer, n), Vh[:n], S, "w_out")
    top = interpreter.top_tokens("OV", layer, n, head, k=5)
    assert torch.equal(top, (ov @ W_U).topk(5, dim=-1).indices)

    class Tokenizer:
        def decode(self, ids):
            return f"<{ids[0]}>"

    named = fb.SVDInterpreter(bridge, tokenizer=Tokenizer()).top_tokens("OV", layer, n, head, k=5)
    assert named == [[f"<{i}>" for i in row] for row in top.tolist()]
    for bad in (dict(vector_type="OV", layer_index=1), dict(vector_type="QK", layer_index=1, head_index=0),
                dict(vector_type="w_in", layer_index=3), dict(vector_type="OV", layer_index=0, head_index=0, num_vectors=13)):  # fmt: skip
        with pytest.raises(ValueError):
            interpreter.get_singular_vectors(**bad)


@pytest.mark.parametrize("architecture", architectures())
def test_svd_interpreter_works_for_every_family(architecture):
    bridge = fb.Bridge.from_hf(tiny_model(architecture).double())
    interpreter = fb.SVDInterpreter(bridge)
    d_vocab_out = bridge.cfg.d_vocab_out
    mlp = (("w_in", None), ("w_out", None))
    if bridge.cfg.num_experts is not None:  # experts, not one MLP: refused by name
        mlp = ()
        with pytest.raises(ValueError, match="mixtures of experts"):
            interpreter.get_singular_vectors("w_in", 1, 3)
    for vector_type, head in (("OV", 3), ("QK_query", 3), ("QK_key", 0), *mlp):
        assert interpreter.get_singular_vectors(vector_type, 1, 3, head).shape == (d_vocab_out, 1, 3)


@pytest.mark.parametrize("variant", ["post_ln_project", "project_unbiased_weightless_untied"])
def test_svd_interpreter_reads_through_opts_projections(variant):
    """OPT with word_embed_proj_dim: W_U reads [d_embed], so a residual vector is read through
    project_out first, and a token enters the stream through project_in. Oracle: HF's own modules
    (lm_head after project_out; project_in after embed_tokens), in float64."""
    from family_helpers import make_family

    hf = make_family("opt", variant).double()
    bridge = fb.Bridge.from_hf(hf)
    interpreter = fb.SVDInterpreter(bridge)
    decoder = hf.model.decoder
    with torch.no_grad():
        unembed = decoder.project_out.weight.T @ hf.lm_head.weight.T  # [d_model, d_vocab]
        embed = decoder.project_in(decoder.embed_tokens.weight)  # [d_vocab, d_model]
    for vector_type, head in (("OV", 1), ("QK_key", 0), ("w_out", None)):
        directions = interpreter.singular_directions(vector_type, 1, 3, head)  # [3, d_model]
        for through, readout in (("W_U", unembed), ("W_E", embed.T)):
            read = interpreter.get_singular_vectors(vector_type, 1, 3, head, through=through)
            expected = (directions @ readout).T[:, None, :]
            assert read.shape == expected.shape == (bridge.cfg.d_vocab_out, 1, 3)
            assert_rounding_close(read, expected, n=bridge.cfg.d_model + hf.config.word_embed_proj_dim, what=f"{vector_type} through {through}")
