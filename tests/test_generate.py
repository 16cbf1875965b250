"""Bridge.generate and fb.generate_tokens against independent oracles: HF's generate (greedy,
token for token, batched and left-padded), a reference loop of torch.multinomial over our own
uncached logits (sampling with a seed), a loop of run_with_hooks on the growing sequence
(steering hooks live during generation). TransformerLens 3.9's generate: parity/test_tl_oracle_generate.py."""

from __future__ import annotations

import copy

import pytest
import torch

import functional_bridge as fb
from helpers import make_gpt2
from tiny_models import causal_lm_architectures, tiny_model
from tokenizers_local import gpt2_tokenizer
from float64_reference import float64_everywhere, float64_reference
from tolerance import assert_as_accurate_as

NEW = 8


def _prompt(cfg, seed=0):
    tokens = torch.randint(1, cfg.d_vocab, (3, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # left padding of different lengths
    mask[2, :4] = 0
    return tokens.masked_fill(mask == 0, 0), mask


def _hf_greedy(hf, tokens, mask, new=NEW, output_logits=False):
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        return hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                           output_logits=output_logits, return_dict_in_generate=output_logits)  # fmt: skip


@pytest.mark.parametrize("architecture", causal_lm_architectures())
@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_greedy_equals_hf_generate(architecture, use_cache):
    """Token for token, and each step's logits as accurate as HF's against HF in float64 (tiny
    random models often repeat one token, so the logits carry the comparison)."""
    hf = tiny_model(architecture)
    bridge = fb.Bridge.from_hf(hf)
    tokens, mask = _prompt(bridge.cfg)
    ours = bridge.generate(tokens, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask,
                           use_past_kv_cache=use_cache, verbose=False, output_logits=True)  # fmt: skip
    theirs = _hf_greedy(hf, tokens, mask, output_logits=True)
    with float64_everywhere():
        theirs64 = _hf_greedy(float64_reference(hf, copy.deepcopy(hf.config)), tokens, mask, output_logits=True)
    assert torch.equal(ours.sequences, theirs.sequences) and torch.equal(theirs64.sequences, theirs.sequences)
    assert_as_accurate_as(torch.stack(ours.logits, 1), torch.stack(theirs.logits, 1), torch.stack(theirs64.logits, 1), what=architecture)


def test_each_padded_row_generates_what_it_generates_alone():
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    tokens, mask = _prompt(bridge.cfg)
    batched = bridge.generate(tokens, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask, verbose=False)
    for row in range(3):
        alone = tokens[row][mask[row].bool()][None]
        single = bridge.generate(alone, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False)
        assert torch.equal(batched[row, -NEW:], single[0, -NEW:])


def _reference_sampling(bridge, tokens, mask, seed, temperature, top_k=None):
    """torch.multinomial over uncached logits of the growing sequence, drawn from one generator."""
    gen = torch.Generator().manual_seed(seed)
    sequence, mask = tokens, mask.bool()
    for _ in range(NEW):
        with torch.no_grad():
            logits = fb.forward(bridge.params, sequence, bridge.cfg, attention_mask=mask)[:, -1] / temperature
        if top_k is not None:
            kth = logits.sort(-1, descending=True).values[:, top_k - 1 : top_k]
            logits = torch.where(logits >= kth, logits, torch.full_like(logits, -torch.inf))
        new = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=gen)
        sequence, mask = torch.cat([sequence, new], 1), torch.cat([mask, torch.ones_like(new, dtype=torch.bool)], 1)
    return sequence


@pytest.mark.parametrize("architecture", ["GPT2LMHeadModel", "Qwen3ForCausalLM", "Gemma2ForCausalLM"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_sampling_with_a_seed_equals_a_multinomial_loop(architecture, top_k):
    bridge = fb.Bridge.from_hf(tiny_model(architecture))
    tokens, mask = _prompt(bridge.cfg)
    ours = bridge.generate(tokens, max_new_tokens=NEW, stop_at_eos=False, attention_mask=mask, temperature=0.7, top_k=top_k,
                           seed=3, verbose=False)  # fmt: skip
    assert torch.equal(ours, _reference_sampling(bridge, tokens, mask, 3, 0.7, top_k))
    other = bridge.generate(tokens, max_new_tokens=NEW, stop_at_eos=False, attention_mask=mask, temperature=0.7, top_k=top_k,
                            seed=4, verbose=False)  # fmt: skip
    assert not torch.equal(ours, other)  # the seed matters


def _steer(vector):
    def hook(resid, hook):
        return resid + vector

    return hook


@pytest.mark.parametrize("how", ["fwd_hooks", "hooks_context", "add_hook"])
def test_steering_hook_acts_on_every_step(how):
    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    tokens, mask = _prompt(bridge.cfg)
    vector = 3.0 * torch.randn(bridge.cfg.d_model, generator=torch.Generator().manual_seed(5))
    hooks = [("blocks.0.hook_resid_post", _steer(vector))]
    kwargs = dict(max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask, verbose=False)
    if how == "fwd_hooks":
        ours = bridge.generate(tokens, fwd_hooks=hooks, **kwargs)
    elif how == "hooks_context":
        with bridge.hooks(fwd_hooks=hooks):
            ours = bridge.generate(tokens, **kwargs)
    else:
        bridge.add_hook(*hooks[0])
        ours = bridge.generate(tokens, **kwargs)
        bridge.reset_hooks()
    sequence, full_mask = tokens, mask
    for _ in range(NEW):  # the oracle: run_with_hooks on the growing sequence, argmax
        with torch.no_grad():
            logits = bridge.run_with_hooks(sequence, fwd_hooks=hooks, attention_mask=full_mask)
        new = logits[:, -1].argmax(-1, keepdim=True)
        sequence, full_mask = torch.cat([sequence, new], 1), torch.cat([full_mask, torch.ones_like(new)], 1)
    assert torch.equal(ours, sequence)
    assert not torch.equal(ours, bridge.generate(tokens, **kwargs))  # the hook changed something, and was removed


def test_text_in_text_out_left_pads_a_batch_and_stops_at_eos():
    tokenizer = gpt2_tokenizer()
    hf = make_gpt2(vocab_size=len(tokenizer), n_positions=64)
    bridge = fb.Bridge.from_hf(hf, tokenizer=tokenizer)
    prompts = ["The cat sat", "When Mary and John went to the store"]
    texts = bridge.generate(prompts, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False)
    tokens = bridge.to_tokens(prompts, padding_side="left")
    mask = tokenizer([tokenizer.bos_token + p for p in prompts], return_tensors="pt", padding=True, padding_side="left")["attention_mask"]
    assert not mask.all() and mask.shape == tokens.shape
    expected = _hf_greedy(hf, tokens, mask)
    assert texts == [tokenizer.decode(row, skip_special_tokens=True) for row in expected]
    assert isinstance(bridge.generate("The cat", max_new_tokens=2, do_sample=False, verbose=False), str)
    # stop_at_eos: a row that emits eos gets eos after it; the loop stops when every row has
    eos = int(expected[0, tokens.shape[1]])  # make the first generated token of row 0 the "eos"
    out = bridge.generate(tokens, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, verbose=False)
    assert (out[0, tokens.shape[1]:] == eos).all()


def test_refusals_name_the_problem():
    bridge = fb.Bridge.from_hf(tiny_model("GPT2LMHeadModel"))
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="d_model"):
        bridge.generate(torch.randn(1, 3, bridge.cfg.d_model + 1), stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="freq_penalty"):
        bridge.generate(torch.randn(1, 3, bridge.cfg.d_model), freq_penalty=1.0, stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="return_cache"):
        bridge.generate(tokens, names_filter="hook_embed", stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="eos_token_id"):
        bridge.generate(tokens, verbose=False)
    with pytest.raises(ValueError, match="left padding"):
        bridge.generate(tokens, attention_mask=torch.tensor([[1, 1, 0]]), stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="return_type"):
        bridge.generate(tokens, return_type="logits", stop_at_eos=False, verbose=False)
    with pytest.raises(NotImplementedError, match="BertForMaskedLM"):
        fb.Bridge.from_hf(tiny_model("BertForMaskedLM")).generate(tokens, stop_at_eos=False, verbose=False)


@pytest.mark.parametrize("options", [dict(top_p=0.8), dict(top_k=7), dict(freq_penalty=0.5), dict(top_p=0.5, freq_penalty=1.0)],
                         ids=["top_p", "top_k", "freq_penalty", "top_p+freq_penalty"])  # fmt: skip
def test_sample_logits_draws_what_transformer_lens_draws(transformer_lens, options):
    """TL 3.9's sample_logits on the global generator vs ours on a generator with the same seed."""
    from transformer_lens.utilities.logits_utils import sample_logits as tl_sample_logits

    gen = torch.Generator().manual_seed(0)
    for seed in range(20):
        logits = 3 * torch.randn(4, 97, generator=gen)
        tokens = torch.randint(0, 97, (4, 12), generator=gen)
        torch.manual_seed(seed)
        theirs = tl_sample_logits(logits.clone(), temperature=0.9, tokens=tokens, **options)
        ours = fb.sample_logits(logits, temperature=0.9, tokens=tokens, generator=torch.Generator().manual_seed(seed), **options)
        assert torch.equal(ours, theirs), seed


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_an_attached_sae_acts_on_every_step(use_cache):
    """An SAE spliced at a hook (bridge.saes) during generate equals a loop of run_with_saes."""
    import functional_bridge.sae as fbsae

    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    tokens, mask = _prompt(bridge.cfg)
    torch.manual_seed(0)
    sae = fbsae.SAE.random(fbsae.SAEConfig(architecture="standard", d_in=bridge.cfg.d_model, d_sae=32, hook_name="blocks.0.hook_resid_post"))
    kwargs = dict(max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask, verbose=False, use_past_kv_cache=use_cache)
    with bridge.saes([sae]):
        ours = bridge.generate(tokens, **kwargs)
    sequence, full_mask = tokens, mask
    for _ in range(NEW):
        with torch.no_grad():
            logits = bridge.run_with_saes(sequence, saes=[sae], attention_mask=full_mask)
        new = logits[:, -1].argmax(-1, keepdim=True)
        sequence, full_mask = torch.cat([sequence, new], 1), torch.cat([full_mask, torch.ones_like(new)], 1)
    assert torch.equal(ours, sequence)
    assert not torch.equal(ours, bridge.generate(tokens, **kwargs))


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv_cache", "no_cache"])
def test_an_sae_bypassed_at_special_tokens_is_bypassed_on_every_step(use_cache):
    """exclude_special_tokens (a list of ids) holds during generate as in forward: each step's
    logits as accurate as a loop of run_with_saes with the same exclusion (float64 reference),
    and measurably not those without it."""
    import functional_bridge.sae as fbsae
    from tolerance import check_above, max_diff

    bridge = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM"))
    bridge64 = fb.Bridge.from_hf(tiny_model("LlamaForCausalLM").double())
    tokens, mask = _prompt(bridge.cfg)
    torch.manual_seed(0)
    sae = fbsae.SAE.random(fbsae.SAEConfig(architecture="standard", d_in=bridge.cfg.d_model, d_sae=32, hook_name="blocks.0.hook_resid_post"))
    excluded = tokens[:, ::2].flatten().tolist()
    kwargs = dict(max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask, verbose=False, use_past_kv_cache=use_cache)
    with bridge.saes([sae], exclude_special_tokens=excluded):
        ours = bridge.generate(tokens, output_logits=True, **kwargs)
    sequence, full_mask = ours.sequences, torch.cat([mask, torch.ones(3, NEW, dtype=mask.dtype)], 1)
    with torch.no_grad():  # the oracle: one uncached forward of the final sequence gives every step's logits
        loop = bridge.run_with_saes(sequence, saes=[sae], exclude_special_tokens=excluded, attention_mask=full_mask)
        loop64 = bridge64.run_with_saes(sequence, saes=[sae.to(torch.float64)], exclude_special_tokens=excluded, attention_mask=full_mask)
        without = bridge.run_with_saes(sequence, saes=[sae], attention_mask=full_mask)
    steps = slice(tokens.shape[1] - 1, -1)  # the positions whose logits chose each new token
    assert_as_accurate_as(torch.stack(ours.logits, 1), loop[:, steps], loop64[:, steps], what="exclusion")
    check_above(max_diff(torch.stack(ours.logits, 1), without[:, steps]), 1e3 * max_diff(loop[:, steps], loop64[:, steps]),
                "the exclusion changes the logits")  # fmt: skip
