"""The Bridge facade against HookedTransformer 3.9 built from the same HF weights and the same
(locally trained) tokenizer, loaded from one saved directory: text methods, forward's TL
arguments, run_with_cache's options, the stateful hook API (forward and backward hooks), the
optional hook points behind TL's flags, the per-block weight views, enable_compatibility_mode.

Both models compute in float64 (GPT-2 and the rotary families), so they differ by summation
order only: every comparison is bounded by float64 rounding at the values' magnitude over the
forward's depth (tests/tolerance.py), and measures the facade's semantics. The float32 forward
against HookedTransformer is checked in test_tl_oracle_gpt2 / _families; here it is checked once
more on enable_compatibility_mode's processed weights (helpers.assert_caches_equal).
"""

from functools import partial

import pytest
import torch
import transformers

import functional_bridge as fb
from functional_bridge.analysis.slicing import take
from family_helpers import make_family
from helpers import assert_caches_equal, hooked_float64, max_diff
from test_tl_oracle_families import hooked_transformer as hooked_family
from test_tl_oracle_gpt2 import hooked_transformer as hooked_gpt2
from test_tl_oracle_processing import processed_hooked_transformer
from tokenizers_local import gpt2_tokenizer, llama_tokenizer, save_pretrained
from tolerance import assert_rounding_close, check_above, forward_depth, max_abs, rounding_bound

pytestmark = pytest.mark.oracle

TEXTS = ["When Mary and John went to the store, John gave a drink to", "Hello world!", "The cat sat"]


def _pair(hf, tokenizer, transformer_lens, build):
    """(Bridge, HookedTransformer), both float64, from one saved directory. ``build`` makes the
    HookedTransformer from ``hf`` (GPT-2's is built in float32, its weights' own precision, and
    then made float64 whole: helpers.hooked_float64)."""
    model = build(hf, transformer_lens)
    if model.cfg.dtype != torch.float64:
        model = hooked_float64(model)
    hf = hf.double()
    path = save_pretrained(hf, tokenizer)
    bridge = fb.Bridge.from_pretrained(path, dtype=torch.float64)
    model.set_tokenizer(transformers.AutoTokenizer.from_pretrained(path))
    model.cfg.default_prepend_bos = tl_default_prepend_bos(path, hf)
    return bridge, model


def tl_default_prepend_bos(path: str, hf) -> bool:
    """What HookedTransformer.from_pretrained would set: TL's own per-architecture config (read
    from the saved directory; its GPT-2 branch needs n_ctx, which transformers 5 no longer has,
    and sets nothing), else TL's global default, True."""
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    if type(hf).__name__ == "GPT2LMHeadModel":
        return True
    return convert_hf_model_config(path).get("default_prepend_bos", True)


def gpt2_pair(transformer_lens):
    from helpers import make_gpt2

    tokenizer = gpt2_tokenizer()
    return _pair(make_gpt2(vocab_size=len(tokenizer), n_positions=64), tokenizer, transformer_lens, hooked_gpt2)


def family_pair(transformer_lens, family="llama", variant="base"):
    tokenizer = llama_tokenizer() if family != "gpt_neox" else gpt2_tokenizer()
    hf = make_family(family, variant, vocab_size=len(tokenizer)).double()
    return _pair(hf, tokenizer, transformer_lens, hooked_family)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, transformer_lens):
    return gpt2_pair(transformer_lens) if request.param == "gpt2" else family_pair(transformer_lens)


def roundings(bridge, backward: bool = False) -> int:
    """Roundings along a forward's longest chain over up to n_ctx tokens (twice that for a
    gradient, which runs the forward and then the backward)."""
    return (2 if backward else 1) * forward_depth(bridge.cfg, bridge.cfg.n_ctx)


def assert_close(ours, theirs, bridge, *, backward: bool = False, scale: float | None = None, what: str = "") -> None:
    """Within rounding (of the coarser dtype: float64 here, float32 where TL computes in float32)
    at the values' magnitude (``scale``, default max |theirs|) over the forward's depth."""
    assert_rounding_close(ours, theirs, n=roundings(bridge, backward), scale=scale, what=what)


def assert_same_cache(ours, theirs, bridge) -> None:
    """Same names in the same order, same shapes, -inf at the same places; activations within
    rounding at the largest activation's magnitude, gradients ("_grad") at the largest
    gradient's."""
    assert list(ours) == list(theirs.keys())
    theirs = dict(theirs.items())
    finite = {name: value.isfinite() for name, value in theirs.items()}
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
        assert torch.equal(ours[name].isfinite(), finite[name]), name
    for grads in (False, True):
        names = [name for name in theirs if name.endswith("_grad") == grads]
        if not names:
            continue
        scale = max(max_abs(theirs[name][finite[name]]) for name in names)
        for name in names:
            assert_close(ours[name][finite[name]], theirs[name][finite[name]], bridge, backward=grads, scale=scale, what=name)


def assert_changed(edited, plain, bridge, what: str = "") -> None:
    """An edit shows: ``edited`` differs from ``plain`` by more than rounding could."""
    check_above(max_diff(edited, plain), rounding_bound(max_abs(plain), plain.dtype, roundings(bridge)), what)


# text ------------------------------------------------------------------------------------------


def test_text_methods_equal_hooked_transformers(pair):
    bridge, model = pair
    assert bridge.cfg.tokenizer_prepends_bos == model.cfg.tokenizer_prepends_bos
    assert bridge.cfg.default_prepend_bos == model.cfg.default_prepend_bos
    for kwargs in ({}, {"prepend_bos": False}, {"padding_side": "left"}, {"padding_side": "left", "prepend_bos": False}):
        assert torch.equal(bridge.to_tokens(TEXTS, **kwargs), model.to_tokens(TEXTS, **kwargs)), kwargs
        assert torch.equal(bridge.to_tokens(TEXTS[0], **kwargs), model.to_tokens(TEXTS[0], **kwargs)), kwargs
        assert bridge.to_str_tokens(TEXTS[0], **kwargs) == model.to_str_tokens(TEXTS[0], **kwargs), kwargs
    tokens = model.to_tokens(TEXTS)
    assert bridge.to_string(tokens) == model.to_string(tokens)
    assert bridge.to_string(tokens[0]) == model.to_string(tokens[0])
    assert bridge.to_str_tokens(tokens[:1]) == model.to_str_tokens(tokens[:1])
    assert bridge.to_str_tokens(TEXTS) == model.to_str_tokens(TEXTS)
    word = model.to_str_tokens(TEXTS[0], prepend_bos=False)[3]
    assert bridge.to_single_token(word) == model.to_single_token(word)
    assert bridge.to_single_str_token(7) == model.to_single_str_token(7)
    for mode in ("first", "last"):
        assert bridge.get_token_position(word, TEXTS[0], mode=mode) == model.get_token_position(word, TEXTS[0], mode=mode)
    for token in (word, 5, torch.tensor(5), tokens[:, :3]):
        assert torch.equal(bridge.tokens_to_residual_directions(token), model.tokens_to_residual_directions(token))


@pytest.mark.parametrize("family", ["gpt_neox", "qwen3", "qwen2", "llama", "mistral"])
def test_default_prepend_bos_follows_transformer_lens_per_architecture(transformer_lens, family):
    bridge, model = family_pair(transformer_lens, family)
    assert bridge.cfg.default_prepend_bos == model.cfg.default_prepend_bos
    assert torch.equal(bridge.to_tokens(TEXTS), model.to_tokens(TEXTS))


# forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_text_batches_equal_hooked_transformer_at_real_tokens(pair, side):
    """TL masks left padding only; at real tokens both sides agree (right padding is causal)."""
    bridge, model = pair
    with torch.no_grad():
        ours, theirs = bridge(TEXTS, padding_side=side), model(TEXTS, padding_side=side)
    _, mask = bridge._tokenize(TEXTS, None, side)
    real = mask.bool()
    assert mask.sum() < mask.numel()  # the batch is padded
    assert_close(ours[real], theirs[real], bridge)


def test_return_types_and_loss_equal_hooked_transformers(pair):
    bridge, model = pair
    tokens = bridge.to_tokens(TEXTS[0])
    with torch.no_grad():
        assert_close(bridge(TEXTS[0], return_type="loss"), model(TEXTS[0], return_type="loss"), bridge)
        for prepend_bos in (False, True):  # forward's per-call prepend_bos, on text
            ours, theirs = bridge(TEXTS[0], prepend_bos=prepend_bos), model(TEXTS[0], prepend_bos=prepend_bos)
            assert ours.shape == theirs.shape
            assert_close(ours, theirs, bridge, what=f"prepend_bos={prepend_bos}")
        ours = bridge(tokens, return_type="both", loss_per_token=True)
        theirs = model(tokens, return_type="both", loss_per_token=True)
        assert ours.loss.shape == theirs.loss.shape == (1, tokens.shape[1] - 1)
        assert_close(ours.logits, theirs.logits, bridge)
        assert_close(ours.loss, theirs.loss, bridge)
        assert bridge(tokens, return_type=None) is None and model(tokens, return_type=None) is None
        mask = torch.ones_like(tokens)
        mask[:, -3:] = 0  # an explicit mask: both leave those pairs out of the loss
        masked_loss = bridge(tokens, return_type="loss", attention_mask=mask)
        assert_close(masked_loss, model(tokens, return_type="loss", attention_mask=mask), bridge)


@pytest.mark.parametrize("stop", [0, 1, -1])
def test_stop_and_start_at_layer_equal_hooked_transformers(pair, stop):
    bridge, model = pair
    tokens = bridge.to_tokens(TEXTS, padding_side="left")
    mask = bridge._tokenize(TEXTS, None, "left")[1]
    with torch.no_grad():
        resid = model(tokens, stop_at_layer=stop, attention_mask=mask)
        assert_close(bridge(tokens, stop_at_layer=stop, attention_mask=mask), resid, bridge)
        kwargs = dict(start_at_layer=stop, attention_mask=mask, tokens=tokens, return_type="both")
        ours, theirs = bridge(resid, **kwargs), model(resid, **kwargs)
        real = mask.bool()
        assert_close(ours.logits[real], theirs.logits[real], bridge)
        assert_close(ours.loss, theirs.loss, bridge)


# run_with_cache and hooks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"remove_batch_dim": True},
        {"pos_slice": -1},
        {"pos_slice": (1, 4)},
        {"pos_slice": [0, 1]},  # TL indexes the 2 key heads of GQA hook_rot_k with it: keep it < 2
        {"names_filter": "blocks.1.attn.hook_pattern"},
        {"names_filter": ["hook_embed", "blocks.0.hook_resid_post"]},
        {"names_filter": lambda name: name.endswith(("hook_z", "hook_scale")), "device": "cpu"},
        {"return_cache_object": False, "names_filter": lambda name: "mlp" in name},
    ],
)
def test_run_with_cache_options_equal_hooked_transformers(pair, options):
    """Except, on purpose, pos_slice on hook_rot_q / hook_rot_k ([batch, pos, head, d_head]):
    TransformerLens slices their head axis; here the position axis, compared with TL's whole
    activation sliced there."""
    bridge, model = pair
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(TEXTS[0], **options)
        tl_logits, tl_cache = model.run_with_cache(TEXTS[0], **options)
        _, tl_whole = model.run_with_cache(TEXTS[0])
    assert_close(logits, tl_logits, bridge)
    assert isinstance(cache, dict if options.get("return_cache_object") is False else fb.ActivationCache)
    if "pos_slice" in options:
        positions = [options["pos_slice"]] if isinstance(options["pos_slice"], int) else options["pos_slice"]
        tl_cache = dict(tl_cache.items())
        for name in [n for n in tl_cache if n.endswith(("hook_rot_q", "hook_rot_k"))]:
            tl_cache[name] = take(tl_whole[name], positions, 1)
    assert_same_cache(cache, tl_cache, bridge)


def test_run_with_hooks_with_partial_and_layer_equal_hooked_transformers(pair):
    bridge, model = pair

    def scale_head(z, hook, head):
        z = z.clone()
        z[:, :, head] *= hook.layer() + 2
        return z

    hooks = [
        (fb.utils.get_act_name("z", 1), partial(scale_head, head=1)),
        (lambda name: name.endswith("hook_mlp_out"), lambda x, hook: x * 0.5),
    ]
    with torch.no_grad():
        ours, theirs = bridge.run_with_hooks(TEXTS[0], fwd_hooks=hooks), model.run_with_hooks(TEXTS[0], fwd_hooks=hooks)
        plain = bridge(TEXTS[0])
    assert_close(ours, theirs, bridge)
    assert_changed(ours, plain, bridge)
    assert not bridge.list_hooks()


def test_backward_hooks_see_and_replace_gradients_as_hooked_transformers(pair):
    """Gradients at three hook points equal TL's; a hook zeroing the gradient entering block 1
    gives the same parameter gradients in both (block 0's become zero)."""
    bridge, model = pair
    names = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    seen = {"ours": {}, "tl": {}}

    def record(store):
        return lambda grad, hook: store.__setitem__(hook.name, grad.detach().clone())

    for key, m in (("ours", bridge), ("tl", model)):
        m.zero_grad()
        with m.hooks(bwd_hooks=[(n, record(seen[key])) for n in names]):
            m(TEXTS[0], return_type="loss").backward()
    scale = max(max_abs(grad) for grad in seen["tl"].values())  # at the largest gradient's magnitude
    for name in names:
        assert_close(seen["ours"][name], seen["tl"][name], bridge, backward=True, scale=scale, what=name)
    for m in (bridge, model):
        m.zero_grad()
        with m.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda grad, hook: (torch.zeros_like(grad),))]):
            m(TEXTS[0], return_type="loss").backward()
    ours = tl_gradients(bridge)
    theirs = {
        name: torch.zeros_like(param) if param.grad is None else param.grad
        for name, param in model.named_parameters()
        # TL's zero biases where HF has none; a tied W_E's leaf also holds W_U's gradient
        if name in ours and not (name == "embed.W_E" and bridge.cfg.tie_word_embeddings)
    }  # fmt: skip
    scale = max(max_abs(grad) for grad in theirs.values())
    for name, tl_grad in theirs.items():
        assert_close(ours[name], tl_grad, bridge, backward=True, scale=scale, what=name)
    compared = len(theirs)
    assert compared >= 10 and model.blocks[0].mlp.W_out.grad.abs().max() == 0
    bridge.zero_grad(), model.zero_grad()


def tl_gradients(bridge) -> dict:
    """The leaves' gradients seen through the TL view (W_Q's gradient is W_Q's rearrangement of
    its leaf's gradient), for the TL keys the leaves hold."""
    from functional_bridge.editing import present_extras
    from functional_bridge.tl_layout import tl_layout

    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in bridge.named_parameters()}
    backed = tl_layout(bridge.cfg.plain(), present_extras(grads, bridge.cfg)).backed
    return {k: v for k, v in fb.tl_weights(grads, bridge.cfg).items() if k in backed}


def test_incl_bwd_caches_gradients_as_hooked_transformer(pair):
    bridge, model = pair
    names = lambda name: name.endswith(("hook_resid_pre", "hook_pattern"))  # noqa: E731
    loss, cache = bridge.run_with_cache(TEXTS[0], return_type="loss", incl_bwd=True, names_filter=names)
    tl_loss, tl_cache = model.run_with_cache(TEXTS[0], return_type="loss", incl_bwd=True, names_filter=names)
    assert any(name.endswith("_grad") for name in cache)
    assert_same_cache(cache, tl_cache, bridge)
    bridge.zero_grad()
    model.zero_grad()


FLAG_SETS = [("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in"), ("use_attn_in", "use_attn_result")]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_optional_hook_points_equal_hooked_transformers_behind_its_flags(transformer_lens, flags):
    """names_filter=None with TL's flags on: the same hook names, order, shapes and values
    (ln1's hooks with the head axis when the inputs are per head); edits at them alike."""
    for bridge, model in (gpt2_pair(transformer_lens), family_pair(transformer_lens, "gptj"), family_pair(transformer_lens, "gpt_neox")):
        for flag in flags:
            getattr(bridge, "set_" + flag)(True)
            getattr(model, "set_" + flag)(True)
        with torch.no_grad():
            logits, cache = bridge.run_with_cache(TEXTS[0])
            tl_logits, tl_cache = model.run_with_cache(TEXTS[0])
            assert_same_cache(cache, tl_cache, bridge)
            edit = [(n, lambda x, hook: x * 1.5) for n in ("blocks.1.attn.hook_result", "blocks.0.hook_attn_in", "blocks.1.hook_k_input", "blocks.0.hook_mlp_in") if n in tl_cache]
            edited = bridge.run_with_hooks(TEXTS[0], fwd_hooks=edit)
            assert_close(edited, model.run_with_hooks(TEXTS[0], fwd_hooks=edit), bridge)
            assert_changed(edited, logits, bridge)


def test_split_qkv_inputs_under_grouped_query_attention_equal_hooked_transformers(transformer_lens):
    bridge, model = family_pair(transformer_lens, "llama")  # 6 query heads, 2 key/value heads
    for flag in ("use_split_qkv_input", "use_attn_result", "use_hook_mlp_in"):
        getattr(bridge, "set_" + flag)(True)
        getattr(model, "set_" + flag)(True)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(TEXTS[0])
        _, tl_cache = model.run_with_cache(TEXTS[0])
    assert cache["blocks.0.hook_k_input"].shape[2] == 2 and cache["blocks.0.hook_q_input"].shape[2] == 6
    assert_same_cache(cache, tl_cache, bridge)
    with pytest.raises(ValueError, match="grouped-query"):
        bridge.set_use_attn_in(True)


def test_stateful_hook_api_follows_transformer_lens(pair):
    """TL's tests/integration/test_hooks.py, run on both models: hook counts, nesting, a failing
    inner context, permanent and prepended hooks; the hooked outputs agree."""
    bridge, model = pair
    tokens = bridge.to_tokens(TEXTS[0])

    def exercise(m):
        calls = []
        m.add_perma_hook("hook_embed", lambda x, hook: calls.append("perma"))
        with m.hooks(fwd_hooks=[("hook_embed", lambda x, hook: calls.append("outer"))]):
            with pytest.raises(ValueError, match="fail"):
                with m.hooks(fwd_hooks=[("hook_embed", _fail)]):
                    assert len(m.hook_dict["hook_embed"].fwd_hooks) == 3
                    m(tokens)
            assert len(m.hook_dict["hook_embed"].fwd_hooks) == 2
        assert len(m.hook_dict["hook_embed"].fwd_hooks) == 1
        m.add_hook("blocks.0.hook_resid_post", lambda x, hook: x * 2)
        m.add_hook("blocks.0.hook_resid_post", lambda x, hook: x + 1, prepend=True)  # runs first
        with torch.no_grad():
            out = m(tokens)
        m.reset_hooks()
        assert len(m.hook_dict["hook_embed"].fwd_hooks) == 1 and not m.hook_dict["blocks.0.hook_resid_post"].fwd_hooks
        m.reset_hooks(including_permanent=True)
        assert not any(point.fwd_hooks for point in m.hook_dict.values())
        return calls, out

    (calls, out), (tl_calls, tl_out) = exercise(bridge), exercise(model)
    assert calls == tl_calls == ["perma", "outer", "perma"]
    assert_close(out, tl_out, bridge)


def test_hook_contexts_persist_and_clear_as_hooked_transformers(pair):
    """hook.ctx: kept across runs until a clear (run_with_hooks(clear_contexts=True), reset_hooks
    with its default clear_contexts=True), as TL's HookPoint.ctx."""
    bridge, model = pair
    tokens = bridge.to_tokens(TEXTS[0])

    def count(x, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1

    def exercise(m):
        seen = []
        with torch.no_grad():
            for clear in (False, False, True, False):
                m.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", count)], clear_contexts=clear)
                seen.append(m.hook_dict["blocks.0.hook_resid_pre"].ctx.get("calls"))
            m.reset_hooks(clear_contexts=False)
            seen.append(m.hook_dict["blocks.0.hook_resid_pre"].ctx.get("calls"))
            m.reset_hooks()
            seen.append(m.hook_dict["blocks.0.hook_resid_pre"].ctx.get("calls"))
        return seen

    assert exercise(bridge) == exercise(model) == [1, 2, None, 1, 1, None]


def _fail(x, hook):
    raise ValueError("fail")


def test_add_caching_hooks_fill_a_dict_as_hooked_transformers(pair):
    bridge, model = pair
    tokens = bridge.to_tokens(TEXTS[0])
    caches = [m.add_caching_hooks(lambda n: n.endswith("hook_resid_post"), remove_batch_dim=True) for m in (bridge, model)]
    with torch.no_grad():
        bridge(tokens), model(tokens)
    bridge.reset_hooks(), model.reset_hooks()
    assert_same_cache(caches[0], caches[1], bridge)
    cache, fwd, bwd = bridge.get_caching_hooks(["hook_embed"])
    assert [name for name, _ in fwd] == ["hook_embed"] and bwd == [] and cache == {}


# weights ---------------------------------------------------------------------------------------


def test_block_views_and_accumulated_bias_equal_hooked_transformers(pair):
    bridge, model = pair
    for name, param in model.named_parameters():
        path = name.split(".")
        view = bridge.blocks[int(path[1])] if path[0] == "blocks" else getattr(bridge, path[0])
        for part in path[2 if path[0] == "blocks" else 1 :]:
            view = getattr(view, part)
        assert torch.equal(view, param), name
    assert torch.equal(bridge.blocks[1].attn.W_K, model.blocks[1].attn.W_K)  # expanded under GQA
    for layer in range(bridge.cfg.n_layers + 1):
        for mlp_input in (False, True)[: 1 + (layer < bridge.cfg.n_layers)]:
            ours, theirs = bridge.accumulated_bias(layer, mlp_input), model.accumulated_bias(layer, mlp_input)
            assert theirs.dtype == torch.float32  # TL sums into float32 zeros whatever its dtype
            assert_close(ours, theirs, bridge, what=f"accumulated_bias({layer}, {mlp_input})")


def test_enable_compatibility_mode_equals_hooked_transformers_default_processing(transformer_lens):
    """HookedTransformer.from_pretrained's processing (fold_ln, centring, value-bias folding),
    applied to the Bridge's own leaves in place: every cached activation equals TL's, in float32
    as notebooks run (each no further from TL's float64 run than 4x TL's float32 run is)."""
    from helpers import make_gpt2

    tokenizer = gpt2_tokenizer()
    hf = make_gpt2(vocab_size=len(tokenizer), n_positions=64)
    bridge = fb.Bridge.from_hf(hf, tokenizer=tokenizer)
    options = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    model = processed_hooked_transformer(hf, transformer_lens, **options)
    leaves = dict(bridge.named_parameters())
    bridge.enable_compatibility_mode()
    assert all(bridge.get_parameter(name) is leaf for name, leaf in leaves.items())  # in place
    assert_caches_equal(bridge, model, bridge.to_tokens(TEXTS[0]), None)
