"""Training through bridge.parameters() against training the HF model itself."""

import copy

import torch
import torch.nn.functional as F

import functional_bridge as fb
from helpers import make_gpt2, max_diff, random_tokens


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
    reference = copy.deepcopy(hf)
    bridge = fb.Bridge.from_hf(hf)
    sgd = lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9)  # noqa: E731
    train(bridge, bridge.parameters(), sgd, 10, bridge.cfg.d_vocab)
    train(hf_logits(reference), reference.parameters(), sgd, 10, bridge.cfg.d_vocab)
    moved = max_param_diff(bridge.params, dict(make_gpt2(attn="eager").named_parameters()))
    assert moved > 1e-2  # training really changed the weights
    assert max_param_diff(bridge.params, dict(reference.named_parameters())) <= 1e-5


def test_adamw_stays_as_close_to_hf_eager_as_hf_sdpa_does():
    """AdamW divides by each gradient's running RMS, so rounding noise in near-zero gradients is
    magnified up to lr/eps. The bound is HF's own eager-vs-sdpa gap, trained alike."""
    adamw = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    runs = {}
    for attn in ("eager", "sdpa"):
        runs[attn] = make_gpt2(attn=attn)
        train(hf_logits(runs[attn]), runs[attn].parameters(), adamw, 5, runs[attn].config.vocab_size)
    bridge = fb.Bridge.from_hf(make_gpt2(attn="eager"))
    train(bridge, bridge.parameters(), adamw, 5, bridge.cfg.d_vocab)
    eager = dict(runs["eager"].named_parameters())
    hf_gap = max_param_diff(dict(runs["sdpa"].named_parameters()), eager)
    ours = max_param_diff(bridge.params, eager)
    assert ours <= max(hf_gap, 1e-6), (ours, hf_gap)
