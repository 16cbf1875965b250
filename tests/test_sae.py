"""fb.sae without the oracle: configs and params refuse bad input with clear errors; the pure
functions against closed forms."""

import pytest
import torch

import functional_bridge.sae as fbsae
from tolerance import assert_rounding_close


def cfg(**kw):
    return fbsae.SAEConfig(**{"architecture": "standard", "d_in": 8, "d_sae": 16, "hook_name": "blocks.0.hook_resid_pre", **kw})


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(architecture="matryoshka"), "unsupported SAE architecture"),
        (dict(d_sae=0), "d_sae must be a positive int"),
        (dict(architecture="topk"), "needs 0 < k"),
        (dict(architecture="transcoder", d_out=8), "apply_b_dec_to_input is not supported for transcoders"),
        (dict(architecture="transcoder", apply_b_dec_to_input=False), "needs d_out"),
        (dict(reshape_activations="hook_z"), "needs a hook_z hook"),
        (dict(d_out=5), "d_out must be None or d_in"),
        (dict(dtype="int8"), "dtype must be one of"),
    ],
)
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        cfg(**kw)


def test_stateful_normalization_is_refused():
    with pytest.raises(NotImplementedError, match="layer_norm"):
        cfg(normalize_activations="layer_norm")


def test_bad_params_are_named():
    c = cfg()
    params = fbsae.init_sae_params(c)
    with pytest.raises(ValueError, match=r"missing \['b_enc'\]"):
        fbsae.SAE({k: v for k, v in params.items() if k != "b_enc"}, c)
    with pytest.raises(ValueError, match="W_dec: expected shape"):
        fbsae.SAE({**params, "W_dec": params["W_dec"].T}, c)


def test_standard_sae_closed_form():
    c = cfg()
    sae = fbsae.SAE.random(c)
    p, x = sae.params, torch.randn(4, 8)
    acts = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    assert_rounding_close(sae.encode(x), acts, n=8)
    assert_rounding_close(sae.forward(x), acts @ p["W_dec"] + p["b_dec"], n=24)


def test_config_round_trips_through_its_dict():
    c = cfg(architecture="topk", k=3, rescale_acts_by_decoder_norm=True, metadata={"model_name": "gpt2"})
    again = fbsae.SAEConfig.from_dict(c.to_dict())
    assert again == c and again.metadata["model_name"] == "gpt2"
