"""ActivationCache against TransformerLens 3.9's ActivationCache, method by method and option by
option, for GPT-2 and Llama (grouped-query attention, RMSNorm, rotary).

Same activations: HookedTransformer (built from the same HF weights) runs the tokens, and our
cache wraps a copy of TL's own cache dict, with TL's head results (its compute_head_results)
already in it. The oracle is also handed the bridge's weight tensors (equal values, asserted:
our Llama W_out is a transposed view of HF's down_proj, TL's a contiguous copy, and a matmul's
rounding depends on the layout). Then both run the same operations on the same tensors, and
every result must be bitwise equal. Where the operations differ on purpose the bound is the
standard rounding bound of the differing sum (see ``gamma``): our head results (an einsum
where TL multiplies and sums) and the bias row of a float64 model (TL sums biases in float32).
"""

import itertools
import logging

import pytest
import torch

import functional_bridge as fb
from family_helpers import make_family
from helpers import make_gpt2, random_tokens
from test_tl_oracle_analysis import hooked_transformer as gpt2_hooked_transformer
from test_tl_oracle_families import hooked_transformer as family_hooked_transformer
from tolerance import assert_rounding_close, forward_depth

pytestmark = pytest.mark.oracle

FAMILIES = {"gpt2": (make_gpt2, gpt2_hooked_transformer), "llama": (lambda: make_family("llama"), family_hooked_transformer)}
BATCH, POS, N_LAYERS = 3, 7, 3
SETTINGS = [(family, dtype, batch) for family in FAMILIES for dtype in ("float32", "float64") for batch in ("batch", "no_batch")]


def share_weights(model, bridge) -> None:
    """Swap each HookedTransformer weight for the bridge's tensor of the same TL name."""
    ours = bridge.tl_parameters()
    for name, param in list(model.named_parameters()):
        if name in ours:
            assert torch.equal(param, ours[name]), name
            module, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(module), leaf, torch.nn.Parameter(ours[name].detach(), requires_grad=False))


def build(family: str, dtype: torch.dtype, batch: int = BATCH):
    """(bridge, HookedTransformer, our cache, TL's cache, tokens) on the same activations."""
    import transformer_lens

    make_hf, hooked = FAMILIES[family]
    hf = make_hf().to(dtype)
    bridge, model = fb.Bridge.from_hf(hf), hooked(hf, transformer_lens)
    assert bridge.cfg.n_layers == N_LAYERS
    tokens = random_tokens(batch, POS, bridge.cfg.d_vocab)
    with torch.no_grad():
        _, tl_cache = model.run_with_cache(tokens)
    tl_cache.compute_head_results()
    share_weights(model, bridge)
    return bridge, model, fb.ActivationCache(dict(tl_cache.cache_dict), bridge), tl_cache, tokens


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda setting: "-".join(setting))
def same(request):
    family, dtype, batch = request.param
    bridge, model, cache, tl_cache, tokens = build(family, getattr(torch, dtype), 1 if batch == "no_batch" else BATCH)
    if batch == "no_batch":
        # TL recomputes head results it finds without a batch dim (it tests ndim >= 4): let it,
        # then hand ours the result (our remove_batch_dim is tested against TL's below)
        tl_cache.remove_batch_dim()
        tl_cache.compute_head_results()
        cache = fb.ActivationCache(dict(tl_cache.cache_dict), bridge, has_batch_dim=False)
        tokens = tokens[0]
    return bridge, model, cache, tl_cache, tokens


def gamma(n: int, dtype: torch.dtype) -> float:
    """A sum of n terms computed in any order is within gamma_n * sum |terms| of the exact sum,
    gamma_n = n u / (1 - n u), u the unit roundoff (Higham, Accuracy and Stability, 3.1)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


def bias_row_bound(model, layer: int, mlp_input: bool, include_mlp: bool) -> torch.Tensor:
    """TL sums a float64 model's biases in float32, each addition rounding to float32; ours
    are float64 sums: together within gamma_(n+1) in float32 of sum |b|."""
    terms = [model.blocks[l].attn.b_O for l in range(layer)]
    terms += [model.blocks[l].mlp.b_out for l in range(layer)] if include_mlp else []
    terms += [model.blocks[layer].attn.b_O] if mlp_input else []
    total = sum((t.double().abs() for t in terms), torch.zeros(model.cfg.d_model, dtype=torch.float64))
    return gamma(len(terms) + 1, torch.float32) * total


def both(cache, tl_cache, method: str, *args, **options):
    """(ours, TL's) results of one method call."""
    return getattr(cache, method)(*args, **options), getattr(tl_cache, method)(*args, **options)


def compare(ours, theirs, where: str, labels=None, bias_bound=None):
    """Bitwise, except a float64 model's bias row (TL sums it in float32): within bias_bound
    when given (the raw row), else left out (a normalised or projected row goes through the
    same code as the rows compared bitwise)."""
    assert ours.shape == theirs.shape, (where, ours.shape, theirs.shape)
    if not theirs.numel():
        return  # TL's empty stacks are float32 whatever the model's dtype
    assert ours.dtype == theirs.dtype, (where, ours.dtype, theirs.dtype)
    if labels is not None and "bias" in labels and ours.dtype == torch.float64:
        row = labels.index("bias")
        if bias_bound is not None:
            assert ((ours[row] - theirs[row]).abs() <= bias_bound).all(), where
        ours, theirs = torch.cat([ours[:row], ours[row + 1 :]]), torch.cat([theirs[:row], theirs[row + 1 :]])
    assert torch.equal(ours, theirs), (where, (ours.double() - theirs.double()).abs().max().item())


def grid(cycled=None, **options):
    """Every combination of the options' values, as keyword dicts; each ``cycled`` option takes
    its values in turn across the combinations (every value used, fewer calls)."""
    names = list(options)
    calls = [dict(zip(names, values)) for values in itertools.product(*options.values())]
    for name, values in (cycled or {}).items():
        for i, call in enumerate(calls):
            call[name] = values[i % len(values)]
    return calls


def has_mlp(call) -> bool:
    """Not asking for the MLP input of the unembedding (an error in both)."""
    return not (call.get("mlp_input") and call.get("layer") in (None, -1, N_LAYERS))


def has_components(call) -> bool:
    """decompose_resid into block 0 without the embeddings: TL's stack of nothing fails."""
    return call["layer"] != 0 or call["incl_embeds"] or (call["mlp_input"] and call["mode"] != "mlp")


def pos_slices(batch: bool):
    return [None, -1, (1, 4), [0, 5, 2], slice(2, None)] + ([torch.tensor([6, 0])] if batch else [])


def run_grid(cache, tl_cache, method: str, calls, model=None):
    for options in calls:
        where = f"{method}({options})"
        (ours, labels), (theirs, tl_labels) = both(cache, tl_cache, method, return_labels=True, **options)
        assert labels == tl_labels, where
        bias_bound = None
        if "bias" in labels and not options.get("apply_ln") and options.get("project_output_onto") is None:
            layer = options.get("layer")
            layer = cache.cfg.n_layers if layer in (None, -1) else layer
            bias_bound = bias_row_bound(model, layer, options.get("mlp_input", False), options.get("expand_neurons", True))
        compare(ours, theirs, where, labels, bias_bound)


def test_accumulated_and_decomposed_resid(same):
    bridge, _, cache, tl_cache, _ = same
    n, batch = bridge.cfg.n_layers, cache.has_batch_dim
    run_grid(cache, tl_cache, "accumulated_resid", grid(
        layer=[None, -1, 0, 1, n], incl_mid=[False, True], apply_ln=[False, True], pos_slice=pos_slices(batch),
        mlp_input=[False, True],
    ))  # fmt: skip
    calls = grid(
        layer=[None, 0, 2, n], mlp_input=[False, True], mode=["all", "attn", "mlp"], apply_ln=[False, True],
        pos_slice=pos_slices(batch), incl_embeds=[True, False],
    )  # fmt: skip
    run_grid(cache, tl_cache, "decompose_resid", [call for call in calls if has_mlp(call) and has_components(call)])


def test_head_and_neuron_stacks(same):
    bridge, model, cache, tl_cache, _ = same
    n, batch, dtype = bridge.cfg.n_layers, cache.has_batch_dim, cache["hook_embed"].dtype
    gen = torch.Generator().manual_seed(7)
    project_2d = torch.randn(bridge.cfg.d_model, 3, generator=gen, dtype=torch.float64).to(dtype)
    projections = [None, project_2d[:, 1], project_2d]
    run_grid(cache, tl_cache, "stack_head_results", grid(
        layer=[-1, 1, 2, n], incl_remainder=[False, True], apply_ln=[False, True], cycled=dict(pos_slice=pos_slices(batch)),
    ) + [dict(layer=0)])  # fmt: skip
    run_grid(cache, tl_cache, "stack_neuron_results", grid(
        layer=[None, 1, n], incl_remainder=[False, True], apply_ln=[False, True], project_output_onto=projections,
        cycled=dict(pos_slice=[None, -1, [0, 4], (2, 5)], neuron_slice=[None, (10, 30), [3, 70, 5]]),
    ) + grid(layer=[0], apply_ln=[False, True], project_output_onto=projections))  # fmt: skip
    calls = grid(
        layer=[0, 2], neuron_slice=[None, 7, (2, 9)], project_output_onto=projections, cycled=dict(pos_slice=[None, 3, (0, 2)])
    )
    for options in calls:
        if options["neuron_slice"] == 7 and options["project_output_onto"] is not None:
            continue  # TL's shape for an int slice then depends on the product's dims (test_activation_cache.py)
        compare(*both(cache, tl_cache, "get_neuron_results", **options), f"get_neuron_results({options})")


def test_full_resid_decomposition(same):
    bridge, model, cache, tl_cache, _ = same
    n, batch, dtype = bridge.cfg.n_layers, cache.has_batch_dim, cache["hook_embed"].dtype
    gen = torch.Generator().manual_seed(8)
    project_2d = torch.randn(bridge.cfg.d_model, 2, generator=gen, dtype=torch.float64).to(dtype)
    calls = grid(
        layer=[None, 0, 2], mlp_input=[False, True], expand_neurons=[True, False], apply_ln=[False, True],
        project_output_onto=[None, project_2d[:, 0], project_2d], cycled=dict(pos_slice=[None, -1, (1, 5), [4, 0]]),
    ) + grid(layer=[n], expand_neurons=[True, False], apply_ln=[True], project_output_onto=[None, project_2d])  # fmt: skip
    if dtype == torch.float64:  # TL's float32 bias @ a float64 projection fails (test_activation_cache.py checks ours)
        calls = [call for call in calls if call["project_output_onto"] is None or call["apply_ln"]]
    # TL normalises the neurons by ln1's scale where every other row gets ln2's (test_activation_cache.py checks ours)
    folded = lambda call: call["apply_ln"] and call["project_output_onto"] is not None  # noqa: E731
    calls = [call for call in calls if not (folded(call) and call.get("mlp_input") and call["expand_neurons"])]
    run_grid(cache, tl_cache, "get_full_resid_decomposition", filter(has_mlp, calls), model)


def test_apply_ln_to_stack_and_logit_attrs(same):
    bridge, model, cache, tl_cache, tokens = same
    n, batch = bridge.cfg.n_layers, cache.has_batch_dim
    stack, tl_stack = cache.decompose_resid(), tl_cache.decompose_resid()  # [n, *batch, pos, d_model]
    calls = grid(layer=[None, -1, 0, 2, n], mlp_input=[False, True], recompute_ln=[False, True])
    if batch:
        calls += grid(batch_slice=[1, (0, 2), [2, 0], torch.tensor([1])], recompute_ln=[False, True])
    for options in filter(has_mlp, calls):
        ours, theirs = cache.apply_ln_to_stack(stack, **options), tl_cache.apply_ln_to_stack(tl_stack, **options)
        compare(ours, theirs, f"apply_ln_to_stack({options})")
    last, tl_last = cache.decompose_resid(pos_slice=-1), tl_cache.decompose_resid(pos_slice=-1)
    compare(cache.apply_ln_to_stack(last, pos_slice=-1), tl_cache.apply_ln_to_stack(tl_last, pos_slice=-1), "pos -1")
    next_tokens = torch.roll(tokens, -1, dims=-1)
    vocab = {" road": 5, " car": 11}
    bridge.to_single_token = model.to_single_token = vocab.__getitem__  # a tokenizer's answer, both sides
    pairs = [(next_tokens, None), (next_tokens, tokens), (5, None), (torch.tensor(5), 7), (" road", " car"), (" road", 7)]
    for correct, incorrect in pairs:
        ours = cache.logit_attrs(stack, correct, incorrect_tokens=incorrect)
        compare(ours, tl_cache.logit_attrs(tl_stack, correct, incorrect_tokens=incorrect), f"logit_attrs({incorrect})")
    ours = cache.logit_attrs(last, next_tokens[..., -1], tokens[..., -1], pos_slice=-1)
    compare(ours, tl_cache.logit_attrs(tl_last, next_tokens[..., -1], tokens[..., -1], pos_slice=-1), "last position")
    if batch:
        sliced, tl_sliced = stack[:, 1:3], tl_stack[:, 1:3]
        ours = cache.logit_attrs(sliced, next_tokens[1:3], batch_slice=(1, 3), has_batch_dim=False)
        compare(ours, tl_cache.logit_attrs(tl_sliced, next_tokens[1:3], batch_slice=(1, 3), has_batch_dim=False), "batch")
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, next_tokens, 3)
    for args in [("pattern",), ("resid_pre", 2), ("scale", -1, "ln2"), ("z", 1), ("result", None, "attn"), ("mlp_out", n)]:
        compare(*both(cache, tl_cache, "stack_activation", *args), f"stack_activation{args}")


def test_transformer_lens_slice_objects(same):
    """TL's acceptance tests pass utilities.Slice objects as pos_slice, neuron_slice and
    batch_slice: the same results as TL's. (An int-mode neuron Slice fails in TL's stack, as a
    plain int does; ours gives the plain int's result.)"""
    from transformer_lens.utilities import Slice

    bridge, model, cache, tl_cache, tokens = same
    last = Slice(-1)
    calls = [
        ("accumulated_resid", dict(pos_slice=last, apply_ln=True, incl_mid=True)),
        ("decompose_resid", dict(layer=1, pos_slice=last, mlp_input=True, incl_embeds=False, mode="attn")),
        ("stack_head_results", dict(layer=1, pos_slice=last, apply_ln=True, incl_remainder=True)),
        ("stack_neuron_results", dict(layer=1, pos_slice=last, neuron_slice=Slice([0, 1, 2]), apply_ln=True)),
        ("stack_neuron_results", dict(layer=2, pos_slice=Slice((1, 4)), neuron_slice=Slice((3, 9)), incl_remainder=True)),
        ("get_full_resid_decomposition", dict(layer=1, pos_slice=last, apply_ln=True)),
        ("get_full_resid_decomposition", dict(pos_slice=Slice([0, 2]), apply_ln=True, expand_neurons=False)),
    ]
    for method, options in calls:
        (ours, labels), (theirs, tl_labels) = both(cache, tl_cache, method, return_labels=True, **options)
        assert labels == tl_labels, method
        compare(ours, theirs, f"{method}({options})", labels)
    for options in (dict(layer=1, pos_slice=last, neuron_slice=Slice([0, 1, 2])), dict(layer=2, neuron_slice=Slice(3))):
        compare(*both(cache, tl_cache, "get_neuron_results", **options), f"get_neuron_results({options})")
    stack, tl_stack = cache.decompose_resid(pos_slice=-1), tl_cache.decompose_resid(pos_slice=-1)
    batch_slices = [None] + ([Slice([0, 2]), Slice(1)] if cache.has_batch_dim else [])
    for batch_slice in batch_slices:
        options = dict(pos_slice=last, batch_slice=batch_slice)
        compare(*(c.apply_ln_to_stack(s, **options) for c, s in ((cache, stack), (tl_cache, tl_stack))), str(options))
        correct = torch.roll(tokens, -1, -1)[..., -1]
        if batch_slice is not None:
            correct = correct[torch.as_tensor(batch_slice.slice)]
        attrs = (c.logit_attrs(s, correct, **options) for c, s in ((cache, stack), (tl_cache, tl_stack)))
        compare(*attrs, f"logit_attrs({options})")
    ours, labels = cache.stack_neuron_results(2, neuron_slice=Slice(4), return_labels=True)
    plain = cache.stack_neuron_results(2, neuron_slice=4)
    assert labels == ["L0N4", "L1N4"] and torch.equal(ours, plain)


def test_mapping_shorthands_and_repr(same):
    bridge, _, cache, tl_cache, _ = same
    assert list(cache) == list(tl_cache) == list(cache.keys()) == list(tl_cache.keys())
    assert len(cache) == len(tl_cache) and repr(cache) == repr(tl_cache)
    for flag in ("has_embed", "has_pos_embed", "has_batch_dim"):
        assert getattr(cache, flag) == getattr(tl_cache, flag), flag
    assert all(torch.equal(cache[k], v) for k, v in tl_cache.items())
    keys = [
        "k1", "scale2ln1", "pre0", "post2m", "embed", "scale", "normalized", "hook_embed", "ln_final.hook_normalized",
        ("pattern", 0), ("resid_post", -1), ("scale", 2, "ln2"), ("normalized", 1, "ln1"), ("q", 1, "a"), ("post", 0),
        ("mlp_out", 2), ("attn_out", -2), ("z", -1, "attn"), ("resid_mid", 1, "b"), ("attn", 2), ("result", 1),
        ("v", 0, "attention"),
    ]  # fmt: skip
    if cache.has_pos_embed:
        keys += ["pos_embed"]
    for key in keys:  # the same entry picked
        tl_name = next(name for name, value in tl_cache.items() if value is tl_cache[key])
        assert cache[key] is cache.cache_dict[tl_name], key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compute_head_results_within_rounding_of_transformer_lens(family, caplog):
    """Ours: one einsum over d_head; TL: multiply, then sum. Both within gamma_(d_head) of the
    exact sum; same keys, added in the same order."""
    bridge, model, _, tl_cache, _ = build(family, torch.float32)
    without = {k: v for k, v in tl_cache.cache_dict.items() if not k.endswith("hook_result")}
    cache = fb.ActivationCache(dict(without), bridge)
    cache.compute_head_results()
    assert list(cache) == list(tl_cache)
    for layer in range(bridge.cfg.n_layers):
        z = cache["z", layer, "attn"].double().abs()  # [batch, pos, head, d_head]
        W_O = model.blocks[layer].attn.W_O.double().abs()  # [head, d_head, d_model]
        bound = 2 * gamma(bridge.cfg.d_head, torch.float32) * torch.einsum("bphd,hdm->bphm", z, W_O)
        gap = (cache["result", layer, "attn"].double() - tl_cache["result", layer, "attn"].double()).abs()
        assert (gap <= bound).all(), layer
    with caplog.at_level(logging.WARNING):
        cache.compute_head_results()
    assert "already cached" in caplog.text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batch_dim_slicing_and_moves_equal_transformer_lens(family, caplog):
    bridge, model, cache, tl_cache, _ = build(family, torch.float32)
    import transformer_lens

    tl_slice = transformer_lens.utilities.Slice([0, 2])
    for batch_slice in (1, -1, (0, 2), slice(1, None), [2, 0], torch.tensor([1, 2]), tl_slice):
        ours, theirs = both(cache, tl_cache, "apply_slice_to_batch_dim", batch_slice)
        assert ours is not cache and ours.has_batch_dim == theirs.has_batch_dim
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
        compare(ours.decompose_resid(apply_ln=True), theirs.decompose_resid(apply_ln=True), str(batch_slice))
    with pytest.raises(ValueError, match="batch size 3"):
        cache.remove_batch_dim()
    assert cache.has_batch_dim and cache["hook_embed"].shape[0] == BATCH  # nothing half-changed
    one, tl_one = cache.apply_slice_to_batch_dim([1]), tl_cache.apply_slice_to_batch_dim([1])
    entries = one.cache_dict
    assert one.remove_batch_dim() is one and tl_one.remove_batch_dim() is tl_one
    assert not one.has_batch_dim and one.cache_dict is entries  # edited in place, as TL's
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in tl_one.items()}
    with caplog.at_level(logging.WARNING):
        assert one.remove_batch_dim() is one
    assert "already having removed it" in caplog.text
    for method in ("accumulated_resid", "decompose_resid"):  # (TL would recompute its head results here)
        compare(getattr(one, method)(apply_ln=True), getattr(tl_one, method)(apply_ln=True), method)
    with pytest.raises(ValueError, match="without a batch dim"):
        one.apply_slice_to_batch_dim(0)
    assert cache.to(torch.float64) is cache and tl_cache.to(torch.float64) is tl_cache
    assert all(v.dtype == torch.float64 for v in cache.values()) and list(cache) == list(tl_cache)
    assert cache.to("cpu") is cache and all(v.device.type == "cpu" for v in cache.values())


def test_toggle_autodiff_sets_the_global_mode_as_transformer_lens(caplog):
    bridge, _, cache, tl_cache, _ = build("gpt2", torch.float32, batch=1)
    before = torch.is_grad_enabled()
    try:
        for mode in (False, True):
            with caplog.at_level(logging.WARNING):
                cache.toggle_autodiff(mode)
            ours = torch.is_grad_enabled()
            tl_cache.toggle_autodiff(mode)
            assert ours == torch.is_grad_enabled() == mode
        assert "set autodiff to True" in caplog.text
    finally:
        torch.set_grad_enabled(before)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_own_runs_equal_transformer_lens_in_float64(family):
    """Each model's own run_with_cache and own head results, in float64. The two forwards round
    differently, so their activations agree to float64 rounding over the forward's depth
    (tolerance.forward_depth), and so do the analyses: sums of those activations times the same
    weights, normalised by the same cached scales."""
    import transformer_lens

    make_hf, hooked = FAMILIES[family]
    hf = make_hf().double()
    bridge, model = fb.Bridge.from_hf(hf), hooked(hf, transformer_lens)
    tokens = random_tokens(2, POS, bridge.cfg.d_vocab)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, tl_cache = model.run_with_cache(tokens)
    depth = forward_depth(bridge.cfg, POS)
    assert list(cache) == list(tl_cache)
    for name, theirs in tl_cache.items():
        finite = theirs.isfinite()  # not the masked scores
        assert torch.equal(cache[name].isfinite(), finite), name
        assert_rounding_close(cache[name][finite], theirs[finite], n=depth, what=name)
    project = torch.randn(bridge.cfg.d_model, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for method, options in [
        ("accumulated_resid", dict(apply_ln=True, incl_mid=True)), ("decompose_resid", dict(apply_ln=True)),
        ("stack_head_results", dict(apply_ln=True, incl_remainder=True)),
        ("stack_neuron_results", dict(layer=2, apply_ln=True)),
        ("get_full_resid_decomposition", dict(expand_neurons=False, apply_ln=True)),
        ("get_full_resid_decomposition", dict(apply_ln=True, project_output_onto=project)),
    ]:  # fmt: skip
        (ours, labels), (theirs, _) = both(cache, tl_cache, method, return_labels=True, **options)
        if "bias" in labels:  # TL's is summed in float32
            ours, theirs = ours[: labels.index("bias")], theirs[: labels.index("bias")]
        assert_rounding_close(ours, theirs, n=depth, what=method)
