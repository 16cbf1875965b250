"""Property tests: random small models of every supported family (tests/strategies.py) against
HF's own forward.

Oracle and bound (tests/float64_reference.py): HF's modeling code run in float64 end to end. A
float32 result of ours passes when its distance (max abs) to that reference is within FACTOR
times the furthest of HF's own float32 runs (eager, sdpa) from it, plus FLOOR_ULPS float32 ulps
of the reference's largest magnitude; a float64 run of ours, within the same bound scaled by
eps64 / eps32. Both scale with the values and with the rounding this CPU, thread count and BLAS
actually produce, so nothing is tuned to one machine. Properties:

- logits of ours (SDPA and explicit attention paths; float32 and float64) against HF;
- each padded row (random lengths, left or right padding) at its real positions against HF
  running that row alone (an encoder, BERT: against HF's padded run, as its positions count the
  padding);
- run_with_cache's resid_pre/resid_post, final norm output and attention patterns against HF's
  output_hidden_states / output_attentions (eager), with tie_last_hidden_states off so that the
  last hidden state is the last block's output, not the final norm's;
- processed weights (random TransformerLens options) keep HF's log-probs, padded rows included
  (causal LMs: TransformerLens defines no processing for an encoder, and the bridge refuses it);
- set_tl_weights: writing the TL view back changes no leaf, and random values written to random
  writable keys read back bitwise (the inverses are reshapes and transposes), the pure function
  and the Bridge method alike; nothing unwritten moves.

Profiles. Default: 8 examples per property and family (16 for the cheap set_tl_weights one),
``derandomize=True`` and no example database, so every run draws the same examples and CI is
reproducible. ``long``: 60 (120) fresh random examples per test on each run; a failure prints
its drawn case and a ``@reproduce_failure`` blob:

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_properties.py
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import functional_bridge as fb
from family_helpers import supports
from float64_reference import EPS64, assert_as_close_as_hf, float64_everywhere, float64_reference
from functional_bridge.architectures import CAUSAL_LM, family_for, family_for_architecture
from functional_bridge.editing import present_extras
from functional_bridge.tl_layout import hf_dependencies, tl_layout
from strategies import FIELDS, model_cases, padded_batches, token_batches

# Ours may be FACTOR times further from float64 than HF's furthest float32 path, plus FLOOR_ULPS
# ulps of the reference's largest magnitude (HF is sometimes exact: embeddings, a one-token
# softmax). Rounding differently from HF costs a small factor; a wrong formula misses by orders
# of magnitude: eps 0.1% off or a rotary base 0.01% off fails the float64 runs by 1e4-1e9x.
# Over ~4,900 comparisons drawn by the long profile the worst distance was 0.31 of its bound.
FACTOR = 4.0
FLOOR_ULPS = 8.0

_PROFILES = {"default": dict(max_examples=8, derandomize=True), "long": dict(max_examples=60, derandomize=False)}
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
if _PROFILE not in _PROFILES:
    raise ValueError(f"HYPOTHESIS_PROFILE={_PROFILE!r}; known profiles: {', '.join(_PROFILES)}")


def _settings(scale: int = 1):
    profile = _PROFILES[_PROFILE]
    return settings(
        deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow],
        derandomize=profile["derandomize"], max_examples=scale * profile["max_examples"],
    )  # fmt: skip


# Activations whose HF definition is not the bridge's in float64, only in float32: the float64
# comparisons skip them. HF's FastGELU ("gelu_fast") writes sqrt(2/pi) as 0.7978845608, 3e-12
# off, which float32 cannot see and float64 can.
NOT_FLOAT64_EXACT = {"gelu_fast"}

ARCHITECTURES = fb.supported_architectures()
CAUSAL_LMS = [arch for arch in ARCHITECTURES if family_for_architecture(arch).kind == CAUSAL_LM]
FORCE_EXPLICIT = [(lambda name: name.endswith("hook_pattern"), lambda x, hook: None)]


def test_every_supported_architecture_has_a_strategy():
    assert set(ARCHITECTURES) <= set(FIELDS), f"add a config strategy to tests/strategies.py for {set(ARCHITECTURES) - set(FIELDS)}"


def _check(ours, hf, reference, what, eps=None):
    kwargs = {} if eps is None else {"eps": eps}
    assert_as_close_as_hf(ours, hf, reference, what, factor=FACTOR, floor_ulps=FLOOR_ULPS, **kwargs)


def _logits(output) -> torch.Tensor:
    """An HF output's LM logits (BertForPreTraining calls its MLM logits prediction_logits)."""
    return output.logits if hasattr(output, "logits") else output.prediction_logits


def _token_types(data, case, tokens) -> dict:
    """An encoder's drawn token_type_ids [batch, pos] (as keyword arguments); {} for a causal LM."""
    if case.architecture in CAUSAL_LMS:
        return {}
    seed = data.draw(st.integers(0, 2**16), label="token types seed")
    n_types = case.fields["type_vocab_size"]
    return {"token_type_ids": torch.randint(n_types, tokens.shape, generator=torch.Generator().manual_seed(seed))}


class Oracle:
    """A drawn case's HF model in float32 (eager and sdpa) and its float64 reference."""

    def __init__(self, case):
        self.model = case.build()
        self.reference = float64_reference(self.model, case.config())

    def hf(self, tokens, **kwargs) -> dict:
        """HF's float32 runs, eager then sdpa where HF has it: {"hf_eager": output, "hf_sdpa": output}."""
        runs = {}
        for attn in ("eager", "sdpa"):
            if not supports(self.model, attn):  # Gemma 2 has no sdpa path in HF
                continue
            self.model.set_attn_implementation(attn)
            runs[f"hf_{attn}"] = self.model(tokens, **kwargs)
        self.model.set_attn_implementation("eager")
        return runs

    def float64(self, tokens, **kwargs):
        with float64_everywhere():
            return self.reference(tokens, **kwargs)

    def rows_alone(self, tokens, mask, post=lambda logits: logits) -> tuple[torch.Tensor, dict]:
        """(float64 reference, HF's float32 runs) of ``post(logits)`` for each row's real tokens
        run alone, concatenated over rows: [real tokens, d_vocab]."""
        reference = _rows_alone(lambda row: post(_logits(self.float64(row))), tokens, mask)
        hf = _rows_alone(lambda row: {k: post(_logits(out)) for k, out in self.hf(row).items()}, tokens, mask)
        return reference, {name + "_alone": value for name, value in hf.items()}


def _rows_alone(run, tokens, mask):
    """``run`` on each row's real tokens alone (a tensor or a dict of tensors [1, pos, ...]),
    concatenated over rows: [real tokens, ...]."""
    outs = [run(row[real][None]) for row, real in zip(tokens, mask.bool())]
    if isinstance(outs[0], dict):
        return {key: torch.cat([out[key][0] for out in outs]) for key in outs[0]}
    return torch.cat([out[0] for out in outs])


# forward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@_settings()
@given(data=st.data())
def test_logits_are_as_close_to_float64_as_hf(arch, data):
    case = data.draw(model_cases(arch), label="case")
    tokens = data.draw(token_batches(case.fields["vocab_size"]), label="tokens")
    types = _token_types(data, case, tokens)
    oracle = Oracle(case)
    with torch.no_grad():
        reference = _logits(oracle.float64(tokens, **types))
        hf = {name: _logits(out) for name, out in oracle.hf(tokens, **types).items()}
        bridge = fb.Bridge.from_hf(oracle.model)
        ours = {"ours": bridge(tokens, **types), "ours_explicit": bridge(tokens, hooks=FORCE_EXPLICIT, **types)}
        _check(ours, hf, reference, "logits")
        if case.activation in NOT_FLOAT64_EXACT:
            return
        bridge64 = fb.Bridge.from_hf(oracle.reference)
        ours64 = {"ours64": bridge64(tokens, **types), "ours64_explicit": bridge64(tokens, hooks=FORCE_EXPLICIT, **types)}
        _check(ours64, hf, reference, "float64 logits", eps=EPS64)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@_settings()
@given(data=st.data())
def test_padded_rows_equal_each_row_alone(arch, data):
    """Positions count real tokens, so a padded row's logits at its real positions are those of
    the row run alone, on either side, through windows and rotary tables alike. An encoder's
    positions count the padding (HF's rule for BERT): its oracle is HF's padded run, token types
    drawn too."""
    case = data.draw(model_cases(arch), label="case")
    tokens, mask = data.draw(padded_batches(case.fields["vocab_size"]), label="tokens, mask")
    types = _token_types(data, case, tokens)
    real = mask.bool()
    oracle = Oracle(case)
    with torch.no_grad():
        if arch in CAUSAL_LMS:
            reference, hf = oracle.rows_alone(tokens, mask)
        else:
            reference = _logits(oracle.float64(tokens, attention_mask=mask, **types))[real]
            hf = {name: _logits(out)[real] for name, out in oracle.hf(tokens, attention_mask=mask, **types).items()}
        for suffix, model, eps in (("", oracle.model, None), ("64", oracle.reference, EPS64)):
            if eps is not None and case.activation in NOT_FLOAT64_EXACT:
                continue
            bridge = fb.Bridge.from_hf(model)
            ours = {
                "ours" + suffix: bridge(tokens, attention_mask=mask, **types)[real],
                f"ours{suffix}_explicit": bridge(tokens, attention_mask=mask, hooks=FORCE_EXPLICIT, **types)[real],
            }  # fmt: skip
            _check(ours, hf, reference, f"padded logits{suffix}", eps=eps)


# activations ------------------------------------------------------------------------------------


# HF models whose hidden_states[-1] is after the final norm whatever tie_last_hidden_states says
# (their forward appends it after ln_f): the last block's output is not compared there.
LAST_HIDDEN_NORMED = ("GPTNeoForCausalLM", "BloomForCausalLM")


def _hf_activations(output, n_layers: int, causal: bool, last_normed: bool = False) -> dict:
    """HF's base-model output (tie_last_hidden_states off) under our hook names. A post-LN
    encoder's block output is its hook_normalized_resid_post (HookedEncoder's name), and its base
    model ends at the last block (the MLM head's norm is outside it)."""
    acts = {"unembed.hook_in": output.last_hidden_state} if causal else {}  # after the final norm
    block_out = "hook_resid_post" if causal else "hook_normalized_resid_post"
    for layer in range(n_layers):
        acts[f"blocks.{layer}.hook_resid_pre"] = output.hidden_states[layer]
        if layer + 1 < n_layers or not last_normed:
            acts[f"blocks.{layer}.{block_out}"] = output.hidden_states[layer + 1]
        acts[f"blocks.{layer}.attn.hook_pattern"] = output.attentions[layer]  # [batch, head, query_pos, key_pos]
    return acts


@pytest.mark.parametrize("arch", ARCHITECTURES)
@_settings()
@given(data=st.data())
def test_cache_matches_hf_hidden_states_and_attentions(arch, data):
    case = data.draw(model_cases(arch), label="case")
    tokens = data.draw(token_batches(case.fields["vocab_size"]), label="tokens")
    oracle = Oracle(case)
    for model in (oracle.model, oracle.reference):
        model.config.tie_last_hidden_states = False  # hidden_states[-1]: the last block's output
    bridge = fb.Bridge.from_hf(oracle.model)
    n = bridge.cfg.n_layers
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        with float64_everywhere():
            reference = _hf_activations(oracle.reference.base_model(tokens, **kwargs), n, arch in CAUSAL_LMS, arch in LAST_HIDDEN_NORMED)
        hf = _hf_activations(oracle.model.base_model(tokens, **kwargs), n, arch in CAUSAL_LMS, arch in LAST_HIDDEN_NORMED)  # eager: sdpa has no attentions
        _, cache = fb.run_with_cache(bridge.params, tokens, bridge.cfg, names_filter=list(reference))
        params64 = dict(oracle.reference.named_parameters())
        _, cache64 = fb.run_with_cache(params64, tokens, bridge.cfg, names_filter=list(reference))
    assert set(cache) == set(reference)
    for name, value in reference.items():
        _check({"ours": cache[name]}, {"hf_eager": hf[name]}, value, name)
        if case.activation not in NOT_FLOAT64_EXACT:
            _check({"ours64": cache64[name]}, {"hf_eager": hf[name]}, value, name + " (float64)", eps=EPS64)


# processing and edits -------------------------------------------------------------------------


@st.composite
def _processing_options(draw, rotary: bool) -> dict:
    names = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
    options = {name: draw(st.booleans()) for name in names}
    options["refactor_factored_attn_matrices"] = False if rotary else draw(st.booleans())  # refused with rotary
    return options


@pytest.mark.parametrize("arch", CAUSAL_LMS)
@_settings()
@given(data=st.data())
def test_processing_keeps_log_probs(arch, data):
    """Processing changes logits only by a per-position constant (centring the unembedding), so
    log-probs are HF's; padded rows against HF's rows alone (folding b_V into b_O assumes a real
    query's pattern sums to 1)."""
    case = data.draw(model_cases(arch), label="case")
    tokens, mask = data.draw(padded_batches(case.fields["vocab_size"]), label="tokens, mask")
    oracle = Oracle(case)
    bridge = fb.Bridge.from_hf(oracle.model)
    options = data.draw(_processing_options(bridge.cfg.positional_embedding_type == "rotary"), label="options")
    real = mask.bool()
    with torch.no_grad():
        reference, hf = oracle.rows_alone(tokens, mask, post=lambda logits: logits.log_softmax(-1))
        processed = bridge.processed(**options)
        ours = {"processed": processed(tokens, attention_mask=mask).log_softmax(-1)[real]}
        _check(ours, hf, reference, f"processed log-probs {options}")
        if case.activation in NOT_FLOAT64_EXACT:
            return
        params64 = fb.process_weights(dict(oracle.reference.named_parameters()), bridge.cfg, **options)
        ours64 = {"processed64": fb.forward(params64, tokens, bridge.cfg, attention_mask=mask).log_softmax(-1)[real]}
        _check(ours64, hf, reference, f"float64 processed log-probs {options}", eps=EPS64)


def _writable_keys(params, cfg) -> list[str]:
    """TL keys set_tl_weights accepts: those a leaf (or an extra leaf) holds, but the family's
    derived keys (a tied W_U excepted where the family has extra leaves to untie the head into:
    not BERT's tied decoder). Not the gated MLP's b_in/b_out or OLMo's weightless norms, which no
    HF leaf holds."""
    family = family_for(cfg)
    derived = set(family.tl_derived_keys(cfg)) - ({"unembed.W_U"} if family.extra_param_shapes(cfg) else set())
    layout = tl_layout(cfg, present_extras(params, cfg))
    held = layout.backed | set(layout.extra_for)
    return [key for key in fb.tl_weights(params, cfg) if key in held and key not in derived]


def _assert_same(actual, expected, key, rounded) -> None:
    """Bitwise, or for a family's arithmetic TL keys (Gemma's scaled embedding and 1 + w norms)
    and the leaves computed from them, within the two roundings of that arithmetic."""
    if key in rounded:
        bound = 2 * torch.finfo(expected.dtype).eps * (expected.double().abs() + 1)
        assert ((actual.double() - expected.double()).abs() <= bound).all(), key
    else:
        assert torch.equal(actual, expected), key


@pytest.mark.parametrize("arch", ARCHITECTURES)
@_settings(scale=2)
@given(data=st.data())
def test_set_tl_weights_round_trips(arch, data):
    case = data.draw(model_cases(arch), label="case")
    bridge = fb.Bridge.from_hf(case.build())
    cfg = bridge.cfg
    if arch in CAUSAL_LMS and data.draw(st.booleans(), label="processed first"):  # extra leaves present (lm_head, b_U)
        bridge = bridge.processed()
    params = {name: value.detach().clone() for name, value in bridge.params.items()}  # bridge edits in place
    tl = fb.tl_weights(params, cfg)
    writable = _writable_keys(params, cfg)
    global_keys = family_for(cfg).global_tl_keys
    assert global_keys["W_E"] in writable and len(writable) > 2
    if arch not in CAUSAL_LMS:  # BERT's decoder is tied with no leaf to untie it into
        assert global_keys["W_U"] not in writable

    # the TL view written back changes no leaf and no TL value (writing a tied W_U unties it
    # into an extra leaf, with the same values)
    same = fb.set_tl_weights(params, cfg, {key: tl[key].clone() for key in writable})
    assert list(same)[: len(params)] == list(params)
    assert set(same) - set(params) <= set(family_for(cfg).extra_param_shapes(cfg))
    rounded_tl = family_for(cfg).tl_rounded_keys(cfg)
    rounded_hf = {leaf for leaf, keys in hf_dependencies(cfg, present_extras(same, cfg)).items() if keys & rounded_tl}
    for name, value in params.items():
        _assert_same(same[name], value, name, rounded_hf)
    for key, value in fb.tl_weights(same, cfg).items():
        _assert_same(value, tl[key], key, rounded_tl)

    # random values read back bitwise; unwritten keys that are not derived from a written one keep theirs
    keys = data.draw(st.lists(st.sampled_from(writable), min_size=1, max_size=6, unique=True), label="keys")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="value seed"))
    updates = {key: torch.randn(tl[key].shape, generator=gen) for key in keys}
    edited = fb.set_tl_weights(params, cfg, updates)
    bridge.set_tl_weights(updates)
    read_pure, read_bridge = fb.tl_weights(edited, cfg), bridge.tl_parameters()
    assert list(read_pure) == list(read_bridge)
    derived = family_for(cfg).tl_derived_keys(cfg)
    for key, value in read_pure.items():
        assert torch.equal(read_bridge[key], value), key
        if key in updates:
            _assert_same(value, updates[key], key, rounded_tl)
        elif derived.get(key) not in updates and key in tl:
            _assert_same(value, tl[key], key, rounded_tl)

    # a derived key (a grouped-query W_K repeating _W_K, GPT-J's ln2 = ln1, BERT's tied decoder) is
    # refused, naming its source
    refused = sorted(set(derived) - set(writable))
    if refused:
        key = data.draw(st.sampled_from(refused), label="derived key")
        with pytest.raises(ValueError, match=f"edit {derived[key]} instead"):
            fb.set_tl_weights(params, cfg, {key: torch.randn(tl[key].shape, generator=gen)})
