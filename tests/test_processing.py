"""fb.process_weights and Bridge.processed, for every registered family.

Oracles: the unprocessed model (HF's forward and the bridge's), whose log-probs processing must
keep; HF's own classes for what an export can hold; closed forms (gradients of a function that
processing leaves unchanged; the cross-entropy gradient of an unembedding bias); per-member
forwards for a stacked ensemble. TransformerLens itself is the oracle in
parity/test_tl_oracle_processing.py."""

import copy

import pytest
import torch
import torch.nn.functional as F

import functional_bridge as fb
from functional_bridge.architectures import family_for
from helpers import make_gpt2, padding_mask, random_tokens
from tolerance import assert_as_accurate_as, float64, float64_copy
from tiny_models import causal_lm_architectures, tiny_model

OPTIONS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
COMBOS = {
    "all": dict.fromkeys(OPTIONS, True),
    "none": dict.fromkeys(OPTIONS, False),
    **{name: {option: option == name for option in OPTIONS} for name in OPTIONS},
    "all_but_fold_ln": {option: option != "fold_ln" for option in OPTIONS},
}


def storages(params):
    return {value.untyped_storage().data_ptr() for value in params.values()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_processing_keeps_the_hf_layout_and_leaves_the_input_alone(arch, tie):
    bridge = fb.Bridge.from_hf(tiny_model(arch, tie_word_embeddings=tie))
    params, cfg = bridge.params, bridge.cfg
    before = {name: value.detach().clone() for name, value in params.items()}
    out = fb.process_weights(params, cfg)
    for name, value in before.items():
        assert torch.equal(params[name], value), name
        assert out[name].shape == value.shape, name
    assert list(out)[: len(params)] == list(params)
    assert set(out) - set(params) <= set(family_for(cfg).extra_param_shapes(cfg))
    assert not storages(out) & storages(params)  # new tensors, not the input's


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_processing_keeps_log_probs(arch, tie):
    """Log-probs, not logits: centring the unembedding shifts each position's logits by a
    constant. Checked against HF's forward, and with left padding against the unprocessed bridge
    at the real tokens (folding b_V into b_O assumes attention patterns sum to 1)."""
    hf = tiny_model(arch, tie_word_embeddings=tie)
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(3, 12, bridge.cfg.d_vocab)
    mask = padding_mask([12, 9, 7], "left")
    real = mask.bool()  # a padding query attends to nothing, so its pattern does not sum to 1
    with torch.no_grad():
        expected, expected64 = hf(tokens).logits.log_softmax(-1), float64_copy(hf)(tokens).logits.log_softmax(-1)
        expected_padded = bridge(tokens, attention_mask=mask).log_softmax(-1)[real]
        padded64 = fb.forward(float64(bridge.params), tokens, bridge.cfg, attention_mask=mask).log_softmax(-1)[real]
        for combo, options in COMBOS.items():
            processed = bridge.processed(**options)
            assert_as_accurate_as(processed(tokens).log_softmax(-1), expected, expected64, what=combo)
            padded = processed(tokens, attention_mask=mask).log_softmax(-1)[real]
            assert_as_accurate_as(padded, expected_padded, padded64, what=f"{combo}, padded")


@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_refactor_is_refused_with_rotary_embeddings(arch):
    bridge = fb.Bridge.from_hf(tiny_model(arch))
    cfg = bridge.cfg
    if cfg.positional_embedding_type != "rotary":
        cfg = cfg.replace(positional_embedding_type="rotary")  # refused before anything is read
    with pytest.raises(ValueError, match="rotary"):
        fb.process_weights(bridge.params, cfg, refactor_factored_attn_matrices=True)


def test_bridge_processed_is_a_new_bridge_and_the_original_is_untouched():
    bridge = fb.Bridge.from_hf(make_gpt2())
    before = {name: value.detach().clone() for name, value in bridge.state_dict().items()}
    processed = bridge.processed()
    for name, value in bridge.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert processed.cfg == bridge.cfg
    # the same HF config, except that it says what processing did: the head is untied now
    assert processed.hf_config.to_dict() == {**bridge.hf_config.to_dict(), "tie_word_embeddings": False}
    assert list(processed.params) == [*bridge.params, "unembed.b_U", "lm_head.weight"]
    assert all(p.requires_grad and p.is_leaf for p in processed.parameters())
    assert not storages(processed.params) & storages(bridge.params)


@pytest.mark.parametrize("refactor", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_gpt2_exports_every_option_but_fold_ln(tmp_path, tie, refactor):
    """GPT-2 processed without fold_ln is an HF GPT2LMHeadModel (untied head): same log-probs
    through HF's forward, also after save_pretrained + from_pretrained."""
    hf = make_gpt2(tie_word_embeddings=tie)
    options = dict(COMBOS["all_but_fold_ln"], refactor_factored_attn_matrices=refactor)
    exported = fb.Bridge.from_hf(hf).processed(**options).to_hf()
    assert exported.config.tie_word_embeddings is False
    assert exported.lm_head.weight.data_ptr() != exported.transformer.wte.weight.data_ptr()
    exported.save_pretrained(tmp_path)
    reloaded = type(hf).from_pretrained(tmp_path).eval()
    tokens = random_tokens(3, 12, hf.config.vocab_size)
    with torch.no_grad():
        expected, expected64 = hf(tokens).logits.log_softmax(-1), float64_copy(hf)(tokens).logits.log_softmax(-1)
        assert_as_accurate_as(exported(tokens).logits.log_softmax(-1), expected, expected64, what="exported")
        assert_as_accurate_as(reloaded(tokens).logits.log_softmax(-1), expected, expected64, what="reloaded")
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no slot for unembed\.b_U"):
        fb.Bridge.from_hf(hf).processed(**{**options, "fold_ln": True}).to_hf()


@pytest.mark.parametrize("combo", ["all", "fold_ln", "fold_value_biases", "center_unembed"])
@pytest.mark.parametrize("arch", causal_lm_architectures())
def test_to_hf_exports_what_the_hf_class_holds_and_names_what_it_cannot(arch, combo):
    hf = tiny_model(arch, tie_word_embeddings=True)
    bridge = fb.Bridge.from_hf(hf)
    processed = bridge.processed(**COMBOS[combo])
    hf_names = set(dict(tiny_model(arch, tie_word_embeddings=False).named_parameters()))
    unholdable = [name for name in processed.params if name not in hf_names]
    if unholdable:
        with pytest.raises(ValueError, match=f"has no slot for {unholdable[0]}"):
            processed.to_hf()
        return
    tokens = random_tokens(2, 10, bridge.cfg.d_vocab)
    with torch.no_grad():
        expected, expected64 = hf(tokens).logits.log_softmax(-1), float64_copy(hf)(tokens).logits.log_softmax(-1)
        assert_as_accurate_as(processed.to_hf()(tokens).logits.log_softmax(-1), expected, expected64)


def test_processing_commutes_with_gradients():
    """Processing leaves the log-prob function of the original weights unchanged, so the
    gradient of the processed model's loss w.r.t. the original weights equals the original's."""
    bridge = fb.Bridge.from_hf(make_gpt2())
    params, cfg = {k: v.detach() for k, v in bridge.params.items()}, bridge.cfg
    tokens = random_tokens(2, 10, cfg.d_vocab)

    def loss(p, process):
        p = fb.process_weights(p, cfg) if process else p
        return F.cross_entropy(fb.forward(p, tokens, cfg)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    ours = torch.func.grad(loss)(params, True)
    expected, expected64 = torch.func.grad(loss)(params, False), torch.func.grad(loss)(float64(params), False)
    assert_as_accurate_as(ours, expected, expected64)


def test_sgd_on_an_exported_processed_model_matches_hf_training():
    bridge = fb.Bridge.from_hf(make_gpt2(attn="eager")).processed(**COMBOS["all_but_fold_ln"])
    reference = copy.deepcopy(bridge.to_hf())
    reference.set_attn_implementation("eager")
    reference64 = float64_copy(reference)
    runs = [(bridge, bridge.parameters()), (lambda t: reference(t).logits, reference.parameters()),
            (lambda t: reference64(t).logits, reference64.parameters())]  # fmt: skip
    for model, parameters in runs:
        optimizer = torch.optim.SGD(parameters, lr=0.5, momentum=0.9)
        for step in range(5):
            tokens = random_tokens(4, 16, bridge.cfg.d_vocab, seed=step)
            optimizer.zero_grad()
            F.cross_entropy(model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
            optimizer.step()
    ref = dict(reference.named_parameters())
    assert list(bridge.params) == list(ref)  # lm_head.weight included: the untied head
    assert_as_accurate_as(bridge.params, ref, dict(reference64.named_parameters()))


def test_adamw_trains_a_processed_bridge_with_its_extra_leaves():
    """Every leaf, the extras included, gets a gradient; the unembedding bias's is the closed
    form mean(softmax - onehot); AdamW lowers the loss; the TL view follows the leaves."""
    bridge = fb.Bridge.from_hf(make_gpt2()).processed()
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    tokens = random_tokens(4, 16, bridge.cfg.d_vocab)
    losses = []
    for step in range(5):
        optimizer.zero_grad()
        logits = bridge(tokens)[:, :-1].flatten(0, 1)
        loss = F.cross_entropy(logits, tokens[:, 1:].flatten())
        loss.backward()
        if step == 0:
            closed_form = lambda x: (x.softmax(-1) - F.one_hot(tokens[:, 1:].flatten(), bridge.cfg.d_vocab)).mean(0)  # noqa: E731
            b_U_grad = dict(bridge.named_parameters())["unembed.b_U"].grad
            assert_as_accurate_as(b_U_grad, closed_form(logits.detach()), closed_form(logits.detach().double()))
            assert all(p.grad is not None for p in bridge.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    leaves = dict(bridge.named_parameters())
    assert torch.equal(bridge.W_U, leaves["lm_head.weight"].T) and torch.equal(bridge.b_U, leaves["unembed.b_U"])


def test_processed_params_stack_into_an_ensemble():
    members = [fb.Bridge.from_hf(make_gpt2(seed)).processed() for seed in range(3)]
    cfg = members[0].cfg
    stacked = fb.stack_params([m.params for m in members])
    assert list(stacked) == list(members[0].params)
    tokens = random_tokens(2, 10, cfg.d_vocab)
    with torch.no_grad():
        batched = torch.func.vmap(lambda p: fb.forward(p, tokens, cfg))(stacked)
        for index, member in enumerate(members):
            ref64 = fb.forward(float64(member.params), tokens, cfg)
            assert_as_accurate_as(batched[index], member(tokens), ref64, what=f"member {index}")


def test_processing_vmaps_over_an_ensemble():
    """Pure, with no branch on values: vmap processes K stacked members as K separate calls."""
    members = [fb.Bridge.from_hf(make_gpt2(seed)) for seed in range(3)]
    cfg = members[0].cfg
    stacked = {name: value.detach() for name, value in fb.stack_params([m.params for m in members]).items()}
    batched = torch.func.vmap(lambda p: fb.process_weights(p, cfg))(stacked)
    for index, member in enumerate(members):
        expected = fb.process_weights(member.params, cfg)
        assert list(batched) == list(expected)
        for name, value in expected.items():
            assert torch.equal(batched[name][index], value), name
