"""Bad input gets a clear error naming the problem, and changes nothing (DESIGN contract 5)."""

import pytest
import torch
from transformers import GPT2Model, LlamaConfig

import functional_bridge as fb
from helpers import gpt2_config, make_gpt2, random_tokens


@pytest.fixture(scope="module")
def bridge():
    return fb.Bridge.from_hf(make_gpt2())


def snapshot(bridge):
    return {k: v.detach().clone() for k, v in bridge.params.items()}


def unchanged(bridge, before):
    return list(bridge.params) == list(before) and all(torch.equal(bridge.params[k], before[k]) for k in before)


def test_token_ids_outside_the_vocabulary(bridge):
    before = snapshot(bridge)
    for bad in (torch.tensor([[1, 2, 97]]), torch.tensor([[-1, 2]])):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
            bridge(bad)
    with pytest.raises(TypeError, match="integer tensor of token ids"):
        bridge(torch.randn(1, 3))
    assert unchanged(bridge, before)


def test_sequence_longer_than_n_ctx(bridge):
    with pytest.raises(ValueError, match="sequence length 41 exceeds the model's context n_ctx=40"):
        bridge(random_tokens(1, 41, 97))


def test_unknown_hook_name(bridge):
    with pytest.raises(KeyError, match="unknown hook point 'blocks.9.hook_resid_pre'"):
        bridge.run_with_cache(random_tokens(1, 4, 97), names_filter=["blocks.9.hook_resid_pre"])


def test_params_missing_extra_or_misshapen(bridge):
    tokens = random_tokens(1, 4, 97)
    params = dict(bridge.params)
    missing = {k: v for k, v in params.items() if k != "transformer.h.1.attn.c_attn.bias"}
    with pytest.raises(fb.ParamsStructureError, match=r"missing leaves: transformer\.h\.1\.attn\.c_attn\.bias"):
        fb.forward(missing, tokens, bridge.cfg)
    with pytest.raises(fb.ParamsStructureError, match="unexpected leaves: transformer.h.3.ln_1.weight"):
        fb.forward({**params, "transformer.h.3.ln_1.weight": torch.ones(48)}, tokens, bridge.cfg)
    misshapen = {**params, "transformer.wpe.weight": torch.zeros(12, 48)}
    with pytest.raises(fb.ParamsStructureError, match=r"transformer\.wpe\.weight has shape \(12, 48\), expected \(40, 48\)"):
        fb.forward(misshapen, tokens, bridge.cfg)
    with pytest.raises(fb.ParamsStructureError):
        fb.tl_weights(missing, bridge.cfg)


def test_mixed_devices_and_tokens_elsewhere(bridge):
    params = dict(bridge.params)
    meta = {**params, "transformer.ln_f.bias": torch.zeros(48, device="meta")}
    with pytest.raises(ValueError, match="params are on mixed devices: cpu .*meta"):
        fb.forward(meta, random_tokens(1, 4, 97), bridge.cfg)
    with pytest.raises(ValueError, match="tokens are on meta but params are on cpu"):
        bridge(torch.zeros(1, 4, dtype=torch.long, device="meta"))


def test_unsupported_architecture_lists_the_supported():
    with pytest.raises(fb.UnsupportedArchitectureError, match="'GPT2Model'.*supported: .*GPT2LMHeadModel"):
        fb.Bridge.from_hf(GPT2Model(gpt2_config()))
    with pytest.raises(ValueError, match="unsupported architecture"):
        fb.config_from_hf(LlamaConfig(architectures=["MysteryForCausalLM"]))


def test_options_that_change_the_math_are_refused():
    with pytest.raises(ValueError, match="activation_function 'mystery'"):
        fb.config_from_hf(gpt2_config(activation_function="mystery"))
    with pytest.raises(ValueError, match="add_cross_attention"):
        fb.config_from_hf(gpt2_config(add_cross_attention=True))


def test_mismatched_attention_mask(bridge):
    tokens = random_tokens(2, 5, 97)
    with pytest.raises(ValueError, match=r"got tokens \(2, 5\), attention_mask \(2, 4\)"):
        bridge(tokens, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        bridge(tokens, attention_mask=torch.ones(2, 5))
