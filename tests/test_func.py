"""torch.func workflows against plain Python loops and torch.autograd (the oracles)."""


import pytest
import torch
from torch.func import grad, jacrev, jvp, vmap

import functional_bridge as fb
from helpers import make_gpt2, max_diff, padded_batch, random_tokens
from tolerance import (
    adamw_rounding_bound, assert_as_accurate_as, assert_rounding_close, check, float64, forward_depth, max_abs, rounding_bound,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    hf = make_gpt2()
    bridge = fb.Bridge.from_hf(hf)
    return {k: v.detach() for k, v in bridge.params.items()}, bridge.cfg


@pytest.mark.parametrize("side", ["left", "right"])
def test_vmap_grad_per_example_equals_a_loop(model, side):
    params, cfg = model
    tokens, mask = padded_batch(cfg.d_vocab, [9, 4, 7, 2], side)

    def loss(p, row, row_mask):
        logits = fb.forward(p, row, cfg, attention_mask=row_mask)
        return fb.next_token_loss(logits, row[None], row_mask[None])

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, tokens, mask)
    helper = fb.per_example_grads(params, cfg, tokens, mask, chunk_size=3)
    for row in range(len(tokens)):
        real = mask[row].bool()
        grad_alone = torch.func.grad(lambda p: fb.next_token_loss(fb.forward(p, tokens[row][real], cfg), tokens[row][real][None]))
        alone, alone64 = grad_alone(params), grad_alone(float64(params))
        assert_as_accurate_as({name: value[row] for name, value in batched.items()}, alone, alone64, what=f"vmap row {row}")
        assert_as_accurate_as({name: value[row] for name, value in helper.items()}, alone, alone64, what=f"helper row {row}")


def test_next_token_loss_counts_only_real_pairs():
    logits = torch.randn(2, 4, 5)
    tokens = torch.tensor([[1, 2, 3, 4], [0, 0, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])

    def loop(logits):
        terms = [-logits[0, i].log_softmax(-1)[tokens[0, i + 1]] for i in range(3)]
        terms.append(-logits[1, 2].log_softmax(-1)[tokens[1, 3]])
        return torch.stack(terms).mean()

    assert_as_accurate_as(fb.next_token_loss(logits, tokens, mask), loop(logits), loop(logits.double()))


@pytest.mark.parametrize("tied", [True, False])
def test_per_example_grads_scatter_the_embedding_gradient(tied):
    """The embedding's gradient (taken on the looked-up rows and scattered) equals autograd's,
    with the unembedding tied to it or not."""
    hf = make_gpt2(tie_word_embeddings=tied)
    params, cfg = {k: v.detach() for k, v in hf.named_parameters()}, fb.config_from_hf(hf.config)
    tokens = torch.tensor([[3, 5, 3, 9, 3, 1], [7, 7, 2, 5, 0, 4]])  # repeated ids accumulate
    grads = fb.per_example_grads(params, cfg, tokens)

    def autograd(params, row):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = fb.next_token_loss(fb.forward(p, tokens[row], cfg), tokens[row][None])
        return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))

    for row in range(2):
        ours = {name: value[row] for name, value in grads.items()}
        assert_as_accurate_as(ours, autograd(params, row), autograd(float64(params), row), what=f"row {row}")


def test_per_example_grads_custom_loss(model):
    params, cfg = model
    tokens = random_tokens(3, 6, cfg.d_vocab)
    loss_fn = lambda logits, toks, mask: logits[0, -1, 5]  # noqa: E731
    grads = fb.per_example_grads(params, cfg, tokens, loss_fn=loss_fn)
    name = "transformer.h.1.mlp.c_fc.weight"

    def autograd(params, row):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        return torch.autograd.grad(fb.forward(p, tokens[row], cfg)[0, -1, 5], [p[name]])[0]

    for row in range(3):
        assert_as_accurate_as(grads[name][row], autograd(params, row), autograd(float64(params), row), what=f"row {row}")


def test_vmapped_ensemble_equals_each_member_with_tied_weights():
    members = [dict(make_gpt2(seed=s).named_parameters()) for s in range(3)]
    cfg = fb.config_from_hf(make_gpt2().config)
    stacked = fb.stack_params(members)
    assert "lm_head.weight" not in stacked and stacked["transformer.wte.weight"].shape[0] == 3
    tokens = random_tokens(2, 8, cfg.d_vocab)
    with torch.no_grad():
        out = vmap(fb.forward, in_dims=(0, None, None))(stacked, tokens, cfg)
        for k, member in enumerate(members):
            ref64 = fb.forward(float64(member), tokens, cfg)
            assert_as_accurate_as(out[k], fb.forward(member, tokens, cfg), ref64, what=f"member {k}")
    for k, member in enumerate(fb.unstack_params(stacked)):
        assert all(torch.equal(member[n], members[k][n]) for n in members[k])


def _train_separately(members, cfg, make_optimizer, batches):
    trained = []
    for member in members:
        params = {k: v.detach().clone().requires_grad_() for k, v in member.items()}
        optimizer = make_optimizer(params.values())
        for tokens in batches:
            optimizer.zero_grad()
            fb.next_token_loss(fb.forward(params, tokens, cfg), tokens).backward()
            optimizer.step()
        trained.append(params)
    return trained


def _train_stacked(members, cfg, make_optimizer, batches):
    stacked = fb.stack_params(members)
    optimizer = make_optimizer(stacked.values())
    loss_of_member = lambda p, tokens: fb.next_token_loss(fb.forward(p, tokens, cfg), tokens)  # noqa: E731
    for tokens in batches:
        optimizer.zero_grad()
        vmap(loss_of_member, in_dims=(0, None))(stacked, tokens).sum().backward()
        optimizer.step()
    return fb.unstack_params(stacked)


def _adamw_bound(params, cfg, tokens, steps, lr):
    """tolerance.adamw_rounding_bound at the gradients' magnitude at the start, over a forward's
    and a batch's accumulated sums."""
    loss = lambda p: fb.next_token_loss(fb.forward(p, tokens, cfg), tokens)  # noqa: E731
    scale = max(g.abs().max().item() for g in grad(loss)({k: v.detach() for k, v in params.items()}).values())
    n = forward_depth(cfg, tokens.shape[1]) + tokens.numel()
    return adamw_rounding_bound(scale, steps, lr, adam_eps=1e-8, dtype=torch.float64, n=n)


def test_training_an_ensemble_at_once_equals_separate_trainings():
    cfg = fb.config_from_hf(make_gpt2().config)
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)  # noqa: E731
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-3)  # noqa: E731
    for seed in range(3):
        members = [dict(make_gpt2(seed=seed + s).named_parameters()) for s in range(3)]
        batches = [random_tokens(4, 12, cfg.d_vocab, seed=10 + 7 * seed + i) for i in range(5)]
        if seed == 0:  # SGD is linear in the gradients: float32, against separate float64 trainings
            separate, stacked = _train_separately(members, cfg, sgd, batches), _train_stacked(members, cfg, sgd, batches)
            separate64 = _train_separately([float64(m) for m in members], cfg, sgd, batches)
            for k, (one, one64, many) in enumerate(zip(separate, separate64, stacked)):
                assert_as_accurate_as(many, one, one64, what=f"SGD member {k}")
        # AdamW magnifies rounding noise in a near-zero gradient up to lr/eps (1e5 here): compared
        # in float64 (tolerance.adamw_rounding_bound)
        members64 = [{k: v.requires_grad_() for k, v in float64(m).items()} for m in members]
        one = _train_separately(members64[:1], cfg, adamw, batches)[0]
        many = _train_stacked(members64, cfg, adamw, batches)[0]
        bound = _adamw_bound(members64[0], cfg, batches[0], len(batches), lr=1e-3)
        check(max(max_diff(one[n], many[n]) for n in one), bound, f"AdamW seed {seed}")


def test_activation_grads_equal_autograd_on_kept_activations(model):
    params, cfg = model
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    tokens = random_tokens(2, 7, cfg.d_vocab)
    names = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "blocks.2.attn.hook_pattern", "blocks.2.ln2.hook_scale"]
    metric = lambda logits: logits[:, -1, 3].sum() - logits[:, -2, 7].sum()  # noqa: E731
    grads = fb.activation_grads(params, tokens, cfg, metric, names)

    def autograd(params):
        kept = {}
        keep = [(n, lambda x, hook: kept.__setitem__(hook.name, x)) for n in names]
        logits = fb.run_with_hooks(params, tokens, cfg, fwd_hooks=keep)
        return dict(zip(names, torch.autograd.grad(metric(logits), [kept[n] for n in names])))

    expected = autograd(params)
    expected64 = autograd({k: v.requires_grad_() for k, v in float64(params).items()})
    for name, value in expected.items():
        assert grads[name].shape == value.shape
        assert_as_accurate_as(grads[name], value, expected64[name], what=name)


def test_jacrev_and_jvp_over_an_activation_equal_finite_differences(model):
    params, cfg = model
    params = {k: v.double() for k, v in params.items()}
    tokens = random_tokens(1, 6, cfg.d_vocab)
    name = "blocks.1.hook_resid_pre"
    _, cache = fb.run_with_cache(params, tokens, cfg, names_filter=name)
    resid = cache[name]
    f = fb.with_activation(params, tokens, cfg, name, lambda logits: logits[0, -1])  # -> [vocab]
    depth = forward_depth(cfg, tokens.shape[1])
    assert_rounding_close(f(resid), fb.forward(params, tokens, cfg)[0, -1], n=depth, what="replayed forward")
    jac = jacrev(f)(resid)  # [vocab, batch, pos, d_model]
    direction = torch.randn_like(resid)
    _, tangent = jvp(f, (resid,), (direction,))
    step = 1e-6
    central = lambda h: (f(resid + h * direction) - f(resid - h * direction)) / (2 * h)  # noqa: E731
    finite = central(step)
    # A central difference is off by ~h^2 f'''/6 (the change from h to 2h is 3x that) plus f's
    # rounding divided by h.
    fd_error = max_diff(central(2 * step), finite) + rounding_bound(max_abs(f(resid)), torch.float64, depth) / step
    check(max_diff(tangent, finite), fd_error, "jvp")
    check(max_diff(torch.einsum("vbpd,bpd->v", jac, direction), finite), fd_error, "jacrev")
    assert jac[:, :, 1:-1].abs().max() > 0 and jac[:, :, :].abs().max() > 0
