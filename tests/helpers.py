"""Builders shared by the tests: small random HF models with non-trivial weights."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

TINY_GPT2 = dict(n_layer=3, n_embd=48, n_head=4, n_inner=80, vocab_size=97, n_positions=40)
# GPT-2-small's shape with a random init (vocab and context as the real model).
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257, n_positions=1024)


def gpt2_config(**overrides) -> GPT2Config:
    fields = {**TINY_GPT2, "bos_token_id": 0, "eos_token_id": 0, **overrides}
    return GPT2Config(**fields)


def set_attn_implementation(model, implementation: str):
    model.set_attn_implementation(implementation)
    return model


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


def make_gpt2(seed: int = 0, attn: str = "sdpa", perturb: bool = True, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(gpt2_config(**overrides)).eval()
    set_attn_implementation(model, attn)
    return perturb_(model, seed) if perturb else model


def random_tokens(batch: int, pos: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()
