"""fb.sae's pure encode / decode / forward against sae_lens 6.54's SAE objects on the same
weights, for every architecture and convention; the saved folder format both ways.

The bound is float rounding of the same arithmetic (SAELens's operations, in its order): values
at most max |expected|, accumulated over the d_in- and d_sae-long dot products."""

import pytest
import torch

import functional_bridge.sae as fbsae
from tolerance import assert_rounding_close

pytestmark = pytest.mark.oracle

D_IN, D_SAE, D_OUT = 24, 64, 20

VARIANTS = {
    "standard": dict(architecture="standard"),
    "standard_no_b_dec_in": dict(architecture="standard", apply_b_dec_to_input=False),
    "topk": dict(architecture="topk", k=7),
    "topk_rescaled": dict(architecture="topk", k=7, rescale_acts_by_decoder_norm=True),
    "jumprelu": dict(architecture="jumprelu"),
    "gated": dict(architecture="gated"),
    "transcoder": dict(architecture="transcoder", d_out=D_OUT, apply_b_dec_to_input=False, hook_name_out="blocks.0.hook_mlp_out"),
    "skip_transcoder": dict(architecture="skip_transcoder", d_out=D_OUT, apply_b_dec_to_input=False, hook_name_out="blocks.0.hook_mlp_out"),
    "jumprelu_transcoder": dict(architecture="jumprelu_transcoder", d_out=D_OUT, apply_b_dec_to_input=False, hook_name_out="blocks.0.hook_mlp_out"),
    "jumprelu_skip_transcoder": dict(architecture="jumprelu_skip_transcoder", d_out=D_OUT, apply_b_dec_to_input=False, hook_name_out="blocks.0.hook_mlp_out"),
}


def make(variant: str, dtype: str = "float32", seed: int = 0) -> fbsae.SAE:
    fields = dict(d_in=D_IN, d_sae=D_SAE, hook_name="blocks.0.hook_resid_pre", dtype=dtype, **VARIANTS[variant])
    if fields["architecture"].endswith("transcoder"):
        fields["hook_name"] = "blocks.0.ln2.hook_normalized"
    return fbsae.SAE.random(fbsae.SAEConfig(**fields), seed=seed)


def inputs(sae, shape=(3, 5)):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(*shape, sae.cfg.d_in, generator=gen, dtype=torch.float64).to(sae.dtype)


def close(ours, theirs, sae, what):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
    assert_rounding_close(ours, theirs, n=D_IN + D_SAE, what=what)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_encode_decode_forward_equal_sae_lens(sae_lens, variant, dtype):
    ours = make(variant, dtype)
    theirs = fbsae.to_sae_lens(ours)
    assert theirs.cfg.architecture() == ours.cfg.architecture
    x = inputs(ours)
    with torch.no_grad():
        acts = theirs.encode(x)
        close(ours.encode(x), acts, ours, "encode")
        assert (acts != 0).any() and (acts == 0).any(), "a degenerate test: every feature on or off"
        close(ours.decode(acts), theirs.decode(acts), ours, "decode")
        close(ours.forward(x), theirs.forward(x), ours, "forward")


def test_topk_keeps_k_and_rescale_changes_the_choice(sae_lens):
    plain, rescaled = make("topk"), make("topk_rescaled")
    x = inputs(plain)
    assert ((plain.encode(x) != 0).sum(-1) <= 7).all()
    assert not torch.equal(plain.encode(x) != 0, rescaled.encode(x) != 0)


def test_hook_z_flattens_heads(sae_lens):
    cfg = fbsae.SAEConfig("standard", d_in=24, d_sae=D_SAE, hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z")
    ours = fbsae.SAE.random(cfg)
    theirs = fbsae.to_sae_lens(ours)
    z = torch.randn(2, 5, 4, 6)  # [batch, pos, head, d_head]
    with torch.no_grad():
        acts = theirs.encode(z)
        close(ours.encode(z), acts, ours, "encode")
        out = ours.decode(acts)
        assert out.shape == z.shape
        close(out, theirs.decode(acts), ours, "decode")
        close(fbsae.decode(ours.params, acts, cfg, d_head=6), theirs.decode(acts), ours, "pure decode")


@pytest.mark.parametrize("variant", ["standard", "topk_rescaled", "jumprelu", "gated", "skip_transcoder"])
def test_from_sae_lens_shares_its_tensors(sae_lens, variant):
    reference = fbsae.to_sae_lens(make(variant))  # a sae_lens SAE with non-trivial weights
    ours = fbsae.from_sae_lens(reference)
    assert ours.cfg.to_dict()["metadata"]["hook_name"] == reference.cfg.metadata.hook_name
    for name, value in reference.state_dict().items():
        assert ours.params[name].data_ptr() == value.data_ptr(), name
    x = inputs(ours)
    with torch.no_grad():
        close(ours.encode(x), reference.encode(x), ours, "encode")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_folder_format_both_ways(sae_lens, variant, tmp_path):
    ours = make(variant)
    fbsae.save_sae(ours, tmp_path / "ours")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "ours")
    assert theirs.cfg.architecture() == ours.cfg.architecture
    assert theirs.cfg.metadata.hook_name == ours.cfg.hook_name
    assert theirs.cfg.metadata.hook_name_out == ours.cfg.hook_name_out
    for name, value in ours.params.items():
        assert torch.equal(theirs.state_dict()[name], value), name
    theirs.save_model(tmp_path / "theirs")
    back = fbsae.load_sae(tmp_path / "theirs")
    assert back.cfg == ours.cfg
    for name, value in ours.params.items():
        assert torch.equal(back.params[name], value), name


def test_jumprelu_log_threshold_files_are_converted(tmp_path):
    ours = make("jumprelu")
    fbsae.save_sae(ours, tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "sae_weights.safetensors"))
    state["log_threshold"] = state.pop("threshold").log()
    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    back = fbsae.load_sae(tmp_path)
    assert_rounding_close(back.params["threshold"], ours.params["threshold"], what="exp(log(threshold))")
