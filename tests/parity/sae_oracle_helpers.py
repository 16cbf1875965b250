"""Builders for the SAE oracle tests: a GPT-2 Bridge and SAELens's HookedSAETransformer over a
HookedTransformer 3.9 with the same HF weights (float64, where both agree to rounding), and
SAEs of every kind at hooks of that model, with random non-trivial weights (no download)."""

import copy

import torch

import functional_bridge as fb
import functional_bridge.sae as fbsae
from helpers import make_gpt2
from test_tl_oracle_gpt2 import tl_config, tl_conversion
from tolerance import check, forward_depth, max_abs, max_diff, rounding_bound


def hooked_sae_pair(sae_lens, transformer_lens):
    hf = make_gpt2().double()
    bridge = fb.Bridge.from_hf(hf)
    cfg = tl_config(hf, transformer_lens)
    cfg.dtype = torch.float64
    model = sae_lens.HookedSAETransformer(cfg)
    model.load_and_process_state_dict(
        dict(tl_conversion(hf, transformer_lens)), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )  # fmt: skip
    return bridge, model.double().eval()


D = 48  # make_gpt2's d_model (4 heads of 12)
TO_MLP_OUT = dict(apply_b_dec_to_input=False, d_out=D)
SAES = {
    "standard@resid_pre": dict(architecture="standard", hook_name="blocks.1.hook_resid_pre"),
    "topk@mlp_out": dict(architecture="topk", k=9, rescale_acts_by_decoder_norm=True, hook_name="blocks.0.hook_mlp_out"),
    "jumprelu@hook_z": dict(architecture="jumprelu", hook_name="blocks.2.attn.hook_z", reshape_activations="hook_z"),
    "gated@resid_post": dict(architecture="gated", hook_name="blocks.1.hook_resid_post"),
    "transcoder@mlp.hook_in": dict(architecture="transcoder", hook_name="blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out", **TO_MLP_OUT),
    "jumprelu_transcoder@ln2": dict(architecture="jumprelu_transcoder", hook_name="blocks.2.ln2.hook_normalized", hook_name_out="blocks.2.hook_mlp_out", **TO_MLP_OUT),
}


def make_sae(key: str, seed: int = 0, dtype: str = "float64", **overrides) -> fbsae.SAE:
    cfg = fbsae.SAEConfig(d_in=D, d_sae=4 * D, dtype=dtype, **{**SAES[key], **overrides})
    return fbsae.SAE.random(cfg, seed=seed, scale=3.0)


def assert_close_maps(ours: dict, theirs: dict, cfg, n_tokens: int, extra_depth: int = 0):
    """Same keys in the same order; every value within float64 rounding at the largest value's
    magnitude over the forward's depth (plus the SAEs' dot products)."""
    assert list(ours) == list(theirs), (list(ours), list(theirs))
    scale = max(max_abs(v) for v in theirs.values())
    measured = {name: max_diff(ours[name], theirs[name]) for name in theirs}
    worst = max(measured, key=measured.get)
    check(measured[worst], rounding_bound(scale, torch.float64, forward_depth(cfg, n_tokens) + extra_depth), worst)
