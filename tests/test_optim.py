"""Training through bridge.parameters() against training the HF model itself."""

import copy

import torch
import torch.nn.functional as F

import functional_bridge as fb
from helpers import make_gpt2, max_diff, random_tokens
from tolerance import adamw_rounding_bound, assert_as_accurate_as, check, float64_copy, forward_depth


def next_token_loss(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def train(model_fn, parameters, make_optimizer, steps, vocab, seed=0):
    optimizer = make_optimizer(parameters)
    for step in range(steps):
        tokens = random_tokens(4, 16, vocab, seed=seed + step)
        optimizer.zero_grad()
        next_token_loss(model_fn(tokens), tokens).backward()
        optimizer.step()


def hf_logits(hf):
    return lambda tokens: hf(tokens).logits


def max_param_diff(a, b):
    return max(max_diff(a[name], b[name]) for name in b)


def test_sgd_with_momentum_equals_hf_training():
    hf = make_gpt2(attn="eager")
    reference, reference64 = copy.deepcopy(hf), float64_copy(hf)
    bridge = fb.Bridge.from_hf(hf)
    sgd = lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)  # noqa: E731
    train(bridge, bridge.parameters(), sgd, 10, bridge.cfg.d_vocab)
    train(hf_logits(reference), reference.parameters(), sgd, 10, bridge.cfg.d_vocab)
    train(hf_logits(reference64), reference64.parameters(), sgd, 10, bridge.cfg.d_vocab)
    moved = max_param_diff(bridge.params, dict(make_gpt2(attn="eager").named_parameters()))
    assert moved > 1e-2  # training really changed the weights
    assert_as_accurate_as(bridge.params, dict(reference.named_parameters()), dict(reference64.named_parameters()))


def test_adamw_equals_hf_training_in_float64():
    """AdamW divides by each gradient's running RMS, so rounding noise in near-zero gradients is
    magnified up to lr/eps: float32 runs of one training in any two orders of summation (HF's own
    eager and sdpa) drift ~1e-5 apart. In float64 the drift is bounded by
    tolerance.adamw_rounding_bound, far below what a wrong gradient or step moves (~lr)."""
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    reference = make_gpt2(attn="eager").double()
    bridge = fb.Bridge.from_hf(make_gpt2(attn="eager").double())
    tokens = random_tokens(4, 16, bridge.cfg.d_vocab)
    next_token_loss(bridge(tokens), tokens).backward()
    grad_scale = max(p.grad.abs().max().item() for p in bridge.parameters())
    bridge.zero_grad()
    train(hf_logits(reference), reference.parameters(), adamw, 5, reference.config.vocab_size)
    train(bridge, bridge.parameters(), adamw, 5, bridge.cfg.d_vocab)
    n = forward_depth(bridge.cfg, tokens.shape[1]) + tokens.numel()
    bound = adamw_rounding_bound(grad_scale, steps=5, lr=1e-3, adam_eps=1e-8, dtype=torch.float64, n=n)
    check(max_param_diff(bridge.params, dict(reference.named_parameters())), bound)
