"""Builders shared by the tests: small random HF models with non-trivial weights."""

from __future__ import annotations

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tolerance import assert_as_accurate_as, check, forward_depth, max_abs, rounding_bound

TINY_GPT2 = dict(n_layer=3, n_embd=48, n_head=4, n_inner=80, vocab_size=97, n_positions=40)
# GPT-2-small's shape with a random init (vocab and context as the real model).
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)


def gpt2_config(**overrides) -> GPT2Config:
    fields = {**TINY_GPT2, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    return GPT2Config(**fields)


@torch.no_grad()
def perturb_(model, seed: int = 0, qk_scale: float = 4.0):
    """Move norms and biases away from their init values (1 and 0) and sharpen attention, so
    that a wrong norm, bias, scale or mask shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen).to(param.dtype)
        if name.endswith(".bias") or "ln" in name.split(".")[-2]:
            param.add_(0.1 * noise)
        if name.endswith("c_attn.weight"):
            d = param.shape[0]
            param[:, : 2 * d].mul_(qk_scale)
    return model


def make_gpt2(seed: int = 0, attn: str = "sdpa", qk_scale: float = 4.0, **overrides) -> GPT2LMHeadModel:
    """overrides: GPT2Config fields (an unknown name is an error, not a silent config attribute)."""
    unknown = set(overrides) - set(GPT2Config().to_dict())
    if unknown:
        raise TypeError(f"make_gpt2: {sorted(unknown)} are not GPT2Config fields")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(**overrides)).eval()
    model.set_attn_implementation(attn)
    return perturb_(model, seed, qk_scale)


def random_tokens(batch: int, pos: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def padding_mask(lengths: list[int], side: str) -> torch.Tensor:
    """[len(lengths), max(lengths)]: 1 on each row's real tokens, padding on the ``side``."""
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, width - n :] = 1
        else:
            mask[row, :n] = 1
    return mask


def padded_batch(vocab: int, lengths: list[int], side: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens [rows, max(lengths)] and their padding_mask."""
    return random_tokens(len(lengths), max(lengths), vocab, seed=seed), padding_mask(lengths, side)


def hooked_float64(model):
    """A float64 copy of HookedTransformer ``model``, cfg.dtype included (TL casts norm outputs to it)."""
    model64 = copy.deepcopy(model)
    model64.cfg.dtype = torch.float64
    return model64.double()


def assert_caches_equal(bridge, model, tokens, mask, float64_precision=torch.float64, adapt=None, align=None):
    """Every cached activation (and the logits) of ``bridge`` equals HookedTransformer ``model``'s,
    same names in the same order, masked attention scores -inf in both. Returns (logits, cache,
    HookedTransformer's logits). Grounded (tests/tolerance.py): in float32 each activation is no
    further from HookedTransformer's own run in float64 than 4x HookedTransformer's float32 run
    is; in float64 both are within rounding (of ``float64_precision``: float32 where the oracle
    computes a part in float32 whatever the dtype) at the largest activation's magnitude over the
    forward's depth. adapt: applied to the bridge's cache first (e.g. to take the rows of
    HookedTransformer's data-dependent per-expert hooks). align(name, activation): applied to
    both sides' activations before comparing (e.g. to remove a per-row constant softmax ignores)."""
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, attention_mask=mask)
        cache = cache if adapt is None else adapt(cache)
        tl_logits, tl_cache = model.run_with_cache(tokens, attention_mask=mask)
    assert list(cache) == list(tl_cache.keys())
    for name, value in tl_cache.items():
        assert cache[name].shape == value.shape, name
    ours, theirs = {**cache, "logits": logits}, {**dict(tl_cache.items()), "logits": tl_logits}
    if align is not None:
        ours, theirs = ({name: align(name, value) for name, value in side.items()} for side in (ours, theirs))
    for name in [name for name, value in theirs.items() if not value.is_floating_point()]:  # MoE routing indices
        assert torch.equal(ours.pop(name), theirs.pop(name)), name
    if logits.dtype == torch.float64:
        depth = forward_depth(bridge.cfg, tokens.shape[-1])
        finite = {name: value.isfinite() for name, value in theirs.items()}  # -inf where masked, as TL writes it
        scale = max(max_abs(value[finite[name]]) for name, value in theirs.items())
        for name, value in theirs.items():
            assert torch.equal(ours[name].isfinite(), finite[name]), name
        measured = {name: max_diff(ours[name][finite[name]], value[finite[name]]) for name, value in theirs.items()}
        worst = max(measured, key=measured.get)
        check(measured[worst], rounding_bound(scale, float64_precision, depth), worst)
    else:
        with torch.no_grad():
            tl64_logits, tl64_cache = hooked_float64(model).run_with_cache(tokens, attention_mask=mask)
        assert tl64_logits.dtype == torch.float64
        reference = {**dict(tl64_cache.items()), "logits": tl64_logits}
        assert_as_accurate_as(ours, theirs, {name: reference[name] for name in theirs}, per_key_scale=True)
    return logits, cache, tl_logits


def routed_rows(cfg):
    """Our cache -> HookedTransformer's: its per-expert hooks (hook_gate, hook_pre, hook_post)
    see only the tokens routed to the expert, in its order (by top-k slot, then token); ours see
    every token. Each of its rows is compared with ours for that token."""

    def adapt(cache):
        out = dict(cache.items())
        for layer in range(cfg.n_layers):
            indices = cache[f"blocks.{layer}.mlp.hook_expert_indices"]  # [tokens, k]
            for expert in range(cfg.num_experts):
                _, token = torch.where((indices == expert).T)  # [k, tokens] row-major: slot, then token
                for hook in ("gate", "pre", "post"):
                    name = f"blocks.{layer}.mlp.experts.{expert}.hook_{hook}"
                    out[name] = cache[name][token]
        return out

    return adapt
