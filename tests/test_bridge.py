"""The Bridge facade: construction, the one copy of the truth, state dicts, to(), to_hf."""

import pytest
import torch
from torch.func import functional_call
from transformers import GPT2LMHeadModel

import functional_bridge as fb
from helpers import gpt2_config, make_gpt2, max_diff, random_tokens
from tolerance import assert_as_accurate_as, check, eps, float64_copy


def test_from_hf_adopts_the_hf_tensors_in_hf_order():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    hf_named = list(hf.named_parameters())
    ours = list(bridge.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in hf_named]
    assert all(a is b for (_, a), (_, b) in zip(ours, hf_named))
    assert "lm_head.weight" not in bridge.params  # tied: stored once
    assert sum(p.numel() for p in bridge.parameters()) == sum(p.numel() for p in hf.parameters())
    assert len(list(bridge.buffers())) == 0


def test_untied_head_is_its_own_leaf():
    hf = make_gpt2(tie_word_embeddings=False)
    bridge = fb.Bridge.from_hf(hf)
    assert bridge.params["lm_head.weight"] is hf.lm_head.weight
    assert torch.equal(bridge.W_U, hf.lm_head.weight.T)


def test_functional_call_equals_pure_forward():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    other = {k: torch.randn_like(v) * 0.05 for k, v in bridge.params.items()}
    tokens = random_tokens(2, 9, bridge.cfg.d_vocab)
    with torch.no_grad():
        swapped = functional_call(bridge, other, (tokens,))
        assert torch.equal(swapped, fb.forward(other, tokens, bridge.cfg))
        assert max_diff(swapped, bridge(tokens)) > 1e-3  # the swap really happened


def test_from_config_is_seeded_hf_init():
    cfg = gpt2_config()
    a, b = fb.Bridge.from_config(cfg, seed=3), fb.Bridge.from_config(cfg, seed=3)
    torch.manual_seed(3)
    hf = GPT2LMHeadModel(cfg)
    for name, value in hf.named_parameters():
        assert torch.equal(a.params[name], value), name
        assert torch.equal(b.params[name], value), name
    assert not torch.equal(fb.Bridge.from_config(cfg, seed=4).W_E, a.W_E)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_from_pretrained_reads_a_saved_model(tmp_path, dtype):
    hf = make_gpt2()
    hf.save_pretrained(tmp_path)
    bridge = fb.Bridge.from_pretrained(str(tmp_path), dtype=dtype, device="cpu")
    assert bridge.dtype == (dtype or torch.float32)
    tokens = random_tokens(2, 7, bridge.cfg.d_vocab)
    with torch.no_grad():
        reference = float64_copy(hf)(tokens).logits
        if dtype is None:
            assert_as_accurate_as(bridge(tokens), hf(tokens).logits, reference)
        else:  # as the half-precision parity tests: as accurate as HF in bfloat16, up to one unit of rounding
            hf_error = max_diff(hf.to(bridge.dtype)(tokens).logits, reference)
            ulp = eps(dtype) * reference.abs().max().item()
            check(max_diff(bridge(tokens), reference) - hf_error, ulp, "error over HF's")


def test_to_hf_shares_the_current_tensors(tmp_path):
    bridge = fb.Bridge.from_config(gpt2_config(), seed=1)
    hf = bridge.to_hf()
    assert isinstance(hf, GPT2LMHeadModel)
    assert hf.transformer.h[0].attn.c_attn.weight is bridge.params["transformer.h.0.attn.c_attn.weight"]
    assert hf.lm_head.weight is hf.transformer.wte.weight
    tokens = random_tokens(2, 7, bridge.cfg.d_vocab)
    with torch.no_grad():
        bridge.params["transformer.h.1.mlp.c_fc.bias"].add_(0.5)  # an edit seen by both
        reference = float64_copy(hf)(tokens).logits
        assert_as_accurate_as(bridge(tokens), hf(tokens).logits, reference, what="shared")
    hf.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path)
    with torch.no_grad():
        assert_as_accurate_as(bridge(tokens), reloaded(tokens).logits, reference, what="reloaded")


def test_state_dict_round_trips_with_hf():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    assert list(bridge.state_dict()) == list(hf.state_dict())
    fresh = fb.Bridge.from_config(gpt2_config(), seed=9)
    fresh.load_state_dict(hf.state_dict())
    for name, value in hf.named_parameters():
        assert torch.equal(fresh.params[name], value)
    hf2 = GPT2LMHeadModel(gpt2_config())
    hf2.load_state_dict(fresh.state_dict())
    tokens = random_tokens(1, 6, bridge.cfg.d_vocab)
    with torch.no_grad():
        assert_as_accurate_as(hf2.eval()(tokens).logits, hf(tokens).logits, float64_copy(hf)(tokens).logits)


def test_load_state_dict_changes_nothing_on_error():
    bridge = fb.Bridge.from_config(gpt2_config(), seed=0)
    before = {k: v.clone() for k, v in bridge.params.items()}
    good = {k: v + 1 for k, v in before.items()}
    for bad, message in [
        ({**good, "transformer.h.0.ln_1.weight": torch.zeros(7)}, r"transformer\.h\.0\.ln_1\.weight has shape \(7,\)"),
        ({k: v for k, v in good.items() if k != "transformer.ln_f.bias"}, "missing keys.*ln_f.bias"),
        ({**good, "transformer.extra": torch.zeros(1)}, "unexpected keys.*transformer.extra"),
        ({**good, "lm_head.weight": torch.zeros_like(good["transformer.wte.weight"])}, "lm_head.weight must equal"),
    ]:
        with pytest.raises(fb.ParamsStructureError, match=message):
            bridge.load_state_dict(bad)
        assert all(torch.equal(bridge.params[k], before[k]) for k in before)


def test_to_in_every_torch_call_form():
    bridge = fb.Bridge.from_config(gpt2_config(), seed=0)
    leaf = bridge.params["transformer.h.0.attn.c_attn.weight"]
    assert bridge.to(torch.float64) is bridge and bridge.dtype == torch.float64
    assert bridge.to("cpu", torch.float32).dtype == torch.float32
    assert bridge.to(dtype=torch.bfloat16).dtype == torch.bfloat16
    assert bridge.to(torch.zeros(1, dtype=torch.float16)).dtype == torch.float16
    assert bridge.to(device="cpu", dtype=torch.float32, non_blocking=True).dtype == torch.float32
    assert bridge.to(torch.device("cpu")).device == torch.device("cpu")
    assert bridge.params["transformer.h.0.attn.c_attn.weight"] is leaf  # same leaves, converted
    assert bridge.W_Q.dtype == torch.float32
    tokens = random_tokens(1, 4, bridge.cfg.d_vocab)
    assert bridge.to(torch.bfloat16)(tokens).dtype == torch.bfloat16


def test_tl_view_follows_in_place_edits_and_to():
    bridge = fb.Bridge.from_config(gpt2_config(), seed=0)
    with torch.no_grad():
        bridge.params["transformer.h.2.attn.c_proj.weight"].fill_(0.25)
    assert (bridge.W_O[2] == 0.25).all()
    bridge.to(torch.float64)
    assert bridge.tl_parameters()["blocks.2.attn.W_O"].dtype == torch.float64
