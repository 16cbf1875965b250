"""SAE feature work against its independent oracles: the vmapped K-feature sweep against the
Python loop of hooked forwards; feature attribution by torch.func.grad against autograd's
backward; N stacked SAEs in one vmapped call against N spliced forwards; the pure API against
the Bridge facade. GPT-2 in float64: bounds are float64 rounding over the forward's depth."""

import pytest
import torch

import functional_bridge as fb
import functional_bridge.sae as fbsae
from functional_bridge.sae.features import feature_sweep, stacked_forward
from functional_bridge.sae.run import activation_grads_with_saes, forward_with_saes, run_with_cache_with_saes
from helpers import make_gpt2, random_tokens
from tolerance import check, check_above, forward_depth, max_abs, max_diff, rounding_bound

D = 48


@pytest.fixture(scope="module")
def bridge():
    return fb.Bridge.from_hf(make_gpt2().double())


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(2, 7, 97, seed=5)


def sae(arch="standard", hook="blocks.1.hook_resid_pre", seed=0, **kw):
    cfg = fbsae.SAEConfig(arch, d_in=D, d_sae=96, hook_name=hook, dtype="float64", **kw)
    return fbsae.SAE.random(cfg, seed=seed, scale=3.0)


def bound(bridge, tokens, reference):
    return rounding_bound(max_abs(reference), torch.float64, forward_depth(bridge.cfg, tokens.shape[-1]) + 400)


def metric(logits):
    return logits[:, -1, 3].sum() - logits[:, -1, 5].sum()


@pytest.mark.parametrize("mode, values", [("set", 0.0), ("add", torch.linspace(-2, 2, 6))])
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_feature_sweep_equals_the_loop(bridge, tokens, mode, values, arch):
    s = sae(arch, k=12) if arch == "topk" else sae(arch)
    _, cache = bridge.run_with_cache_with_saes(tokens, saes=[s])
    active = cache["blocks.1.hook_resid_pre.hook_sae_acts_post"].flatten(0, 1).gt(0).sum(0).argsort(descending=True)[:6]
    swept = feature_sweep(bridge.params, tokens, bridge.cfg, s, active, metric, values=values, mode=mode)
    values = torch.broadcast_to(torch.as_tensor(values, dtype=torch.float64), active.shape)
    loop = []
    for feature, value in zip(active.tolist(), values.tolist()):
        def edit(acts, hook, feature=feature, value=value):
            acts = acts.clone()
            acts[..., feature] = value if mode == "set" else acts[..., feature] + value
            return acts

        with torch.no_grad(), bridge.saes([s], use_error_term=True):
            loop.append(metric(bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre.hook_sae_acts_post", edit)])))
    loop = torch.stack(loop)
    check(max_diff(swept, loop), bound(bridge, tokens, loop), "vmapped sweep vs loop")
    with torch.no_grad():
        plain = metric(bridge(tokens))
    check_above(max_diff(loop, plain.expand_as(loop)), 1e3 * bound(bridge, tokens, loop), "the edits change the metric")


def test_feature_attribution_equals_autograd(bridge, tokens):
    s = sae("jumprelu", "blocks.2.attn.hook_z", reshape_activations="hook_z")
    name = "blocks.2.attn.hook_z.hook_sae_acts_post"
    grads = activation_grads_with_saes(bridge.params, tokens, bridge.cfg, [s], metric, name)[name]
    assert torch.equal(fb.activation_grads(bridge.params, tokens, bridge.cfg, metric, name, saes=[s])[name], grads)
    saved = {}

    def keep(acts, hook):
        acts.retain_grad()
        saved["acts"] = acts

    bridge.add_sae(s, use_error_term=True)
    try:
        metric(bridge.run_with_hooks(tokens, fwd_hooks=[(name, keep)])).backward()
    finally:
        bridge.reset_saes()
        bridge.zero_grad(set_to_none=True)
    expected = saved["acts"].grad
    assert grads.shape == expected.shape == (2, 7, 96)
    check(max_diff(grads, expected), rounding_bound(max_abs(expected), torch.float64, forward_depth(bridge.cfg, 7)), "grad vs autograd")
    assert expected.abs().max() > 0


def test_stacked_saes_equal_one_forward_each(bridge, tokens):
    saes = [sae("topk", "blocks.0.hook_mlp_out", seed=i, k=8) for i in range(3)]
    stacked = fbsae.stack([s.params for s in saes])
    out = stacked_forward(bridge.params, tokens, bridge.cfg, stacked, saes[0].cfg)
    with torch.no_grad():
        loop = torch.stack([bridge.run_with_saes(tokens, saes=[s]) for s in saes])
    assert out.shape == (3, 2, 7, 97)
    check(max_diff(out, loop), bound(bridge, tokens, loop), "stacked vs loop")
    assert max_diff(loop[0], loop[1]) > 0


def test_pure_api_equals_the_facade(bridge, tokens):
    t = sae("transcoder", "blocks.1.mlp.hook_in", hook_name_out="blocks.1.hook_mlp_out", d_out=D, apply_b_dec_to_input=False)
    with torch.no_grad():
        logits, cache = run_with_cache_with_saes(bridge.params, tokens, bridge.cfg, [t], use_error_term=True)
        f_logits, f_cache = bridge.run_with_cache_with_saes(tokens, saes=[t], use_error_term=True)
        assert torch.equal(forward_with_saes(bridge.params, tokens, bridge.cfg, t), bridge.run_with_saes(tokens, saes=[t]))
    assert list(cache) == list(f_cache.keys())
    for name in cache:
        assert torch.equal(cache[name], f_cache[name]), name
    assert torch.equal(logits, f_logits)


def test_bad_feature_indices_are_refused(bridge, tokens):
    with pytest.raises(ValueError, match=r"feature indices must be in \[0, 96\)"):
        feature_sweep(bridge.params, tokens, bridge.cfg, sae(), torch.tensor([3, 96]), metric)


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_grad_wrt_sae_params_equals_autograd(bridge, tokens, arch):
    """The SAE is a pytree the spliced forward is a function of: torch.func.grad over it equals
    autograd through the facade's spliced run."""
    from functional_bridge.func import detached

    s = sae(arch)
    params = detached(bridge.params)
    grads = torch.func.grad(lambda p: metric(forward_with_saes(params, tokens, bridge.cfg, [fbsae.SAE(p, s.cfg)])))(s.params)
    leaves = {name: value.clone().requires_grad_() for name, value in s.params.items()}
    try:
        metric(bridge.run_with_saes(tokens, saes=[fbsae.SAE(leaves, s.cfg)])).backward()
    finally:
        bridge.zero_grad(set_to_none=True)
    scale = max(max_abs(g) for g in grads.values())
    for name, leaf in leaves.items():
        expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        check(max_diff(grads[name], expected), rounding_bound(scale, torch.float64, forward_depth(bridge.cfg, 7)), name)
    assert grads["W_dec"].abs().max() > 0


def test_stream_activations_from_text_drops_padding():
    from functional_bridge.sae.stream import stream_activations
    from tokenizers_local import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    bridge = fb.Bridge.from_hf(make_gpt2(vocab_size=len(tokenizer), n_positions=64), tokenizer=tokenizer)
    texts = ["When Mary and John went to the store", "Hello"]
    (rows,) = stream_activations(bridge, [texts], "blocks.1.hook_resid_post")
    expected = []
    for text in texts:  # each text alone: no padding
        _, cache = bridge.run_with_cache(text, names_filter="blocks.1.hook_resid_post")
        expected.append(cache["blocks.1.hook_resid_post"][0])
    expected = torch.cat(expected)
    assert rows.shape == expected.shape
    check(max_diff(rows, expected), rounding_bound(max_abs(expected), rows.dtype, forward_depth(bridge.cfg, 16)), "streamed rows")
