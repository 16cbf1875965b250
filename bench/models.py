"""Model sizes, the shapes each suite runs at, and the contenders' models (random init).

Every model is GPT-2 shaped and built from an HF config with HF's own random init (no
download). The HF model runs with its default attention (sdpa); an "eager twin" is a second HF
model object holding the very same Parameter objects with eager attention, so the two HF
contenders and the bridge all read one set of weights. HookedTransformer, the anchor, is
built from the same HF weights through TransformerLens's own conversion (anchors.py).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

import functional_bridge as fb

SIZES = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128),
    "small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),  # GPT-2 small
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),  # GPT-2 medium
}

Shape = tuple[int, int]  # (batch, pos)


@dataclass(frozen=True)
class Plan:
    """The shapes each suite runs at for one (size, device)."""

    shapes: tuple[Shape, ...]  # forward, cache, compile
    grads: Shape  # per-example gradients: rows of different lengths, left padded
    ensemble: Shape
    patching: Shape  # one worlds sweep over every head
    optimizer: Shape
    parity: Shape
    ensemble_k: int = 8


def plan_for(size: str, device: str, shapes: tuple[Shape, ...] | None = None) -> Plan:
    cuda = torch.device(device).type == "cuda"
    if size == "tiny":
        # per-example gradients at a research batch (32 rows): where vmap's one pass over the
        # batch pays, as the per-op overhead of a small model dominates a loop
        plan = Plan(shapes=((1, 16), (4, 16)), grads=(32, 32), ensemble=(1, 16), patching=(1, 16),
                    optimizer=(4, 16), parity=(4, 16))  # fmt: skip
    elif cuda:
        plan = Plan(shapes=((8, 512),), grads=(32, 128), ensemble=(8, 128), patching=(1, 128),
                    optimizer=(8, 512), parity=(4, 128))  # fmt: skip
    else:
        # On CPU, a 144-world patching sweep at 128 tokens is 144 forwards per loop round: run it
        # at 32 tokens. Per-example gradients: 8 rows of 64 tokens, 64 down to 16 real tokens.
        plan = Plan(shapes=((1, 128), (4, 128)), grads=(8, 64), ensemble=(1, 128), patching=(1, 32),
                    optimizer=(4, 128), parity=(4, 64))  # fmt: skip
    if shapes:
        plan = dataclasses.replace(plan, shapes=tuple(shapes))
    return plan


def hf_config(size: str):
    from transformers import GPT2Config

    fields = dict(SIZES[size], bos_token_id=0, eos_token_id=0)
    if size == "tiny":
        fields["n_inner"] = 4 * fields["n_embd"]
    return GPT2Config(**fields)


def build_hf(size: str, device: str, dtype: torch.dtype, seed: int = 0, attn: str = "sdpa"):
    """GPT2LMHeadModel with HF's random init, eval mode (no dropout: the bridge has none)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = GPT2LMHeadModel._from_config(hf_config(size), attn_implementation=attn)
    return model.to(dtype).eval()


def build_hf_llama(size: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A Llama of the size's GPT-2 width, depth and heads (grouped-query: a third as many key/value
    heads), SwiGLU MLP of 8/3 the width, Llama's 32000-token vocabulary; HF's random init, sdpa,
    eval mode. The generate suite's second model (the issue asks for GPT-2 small and a small Llama)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SIZES[size]
    d, heads = s["n_embd"], s["n_head"]
    config = LlamaConfig(
        hidden_size=d, num_hidden_layers=s["n_layer"], num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
        intermediate_size=int(8 * d / 3) // 64 * 64 or 4 * d, vocab_size=32000 if size != "tiny" else s["vocab_size"],
        max_position_embeddings=s["n_positions"], bos_token_id=0, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    return model.to(dtype).eval()


def hf_twin(model, attn: str):
    """A second HF model object over the same Parameter objects, with another attention."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        twin = type(model)._from_config(config, attn_implementation=attn)
    twin.load_state_dict(model.state_dict(keep_vars=True), assign=True, strict=False)
    twin.tie_weights()
    twin.eval()
    shared = {id(p) for p in model.parameters()}
    if any(id(p) not in shared for p in twin.parameters()):
        raise RuntimeError("the eager twin does not share the model's parameters")
    return twin


def random_tokens(shape: Shape, vocab: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=gen).to(device)


def left_padded_mask(shape: Shape, device: str, shortest: float = 0.25) -> torch.Tensor:
    """[batch, pos] mask of rows with real lengths evenly spread from pos down to pos*shortest,
    padded on the left."""
    batch, pos = shape
    low = max(2, int(round(pos * shortest)))
    lengths = [round(pos - (pos - low) * i / max(1, batch - 1)) for i in range(batch)]
    mask = torch.zeros(shape, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, pos - length :] = 1
    return mask.to(device)


def flops_per_forward(size: str, shape: Shape) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections and MLP (12 d^2 per token
    per layer), attention scores and values (4 pos d per token per layer, full square), and
    the unembedding. About 1.09e12 for GPT-2 small at 8 x 512."""
    s = SIZES[size]
    batch, pos = shape
    d, layers, vocab = s["n_embd"], s["n_layer"], s["vocab_size"]
    d_mlp = 4 * d
    tokens = batch * pos
    per_layer = 2 * tokens * (4 * d * d + 2 * d * d_mlp) + 2 * 2 * batch * pos * pos * d
    return layers * per_layer + 2 * tokens * d * vocab


class Models:
    """The models of one run, built once per dtype and shared by the suites."""

    def __init__(self, size: str, device: str, seed: int = 0):
        self.size, self.device, self.seed = size, device, seed
        self._hf: dict[torch.dtype, object] = {}
        self._twins: dict[tuple[torch.dtype, str], object] = {}
        self._bridges: dict[torch.dtype, fb.Bridge] = {}
        self._llamas: dict[torch.dtype, tuple[object, fb.Bridge]] = {}  # (HF Llama, its bridge)
        self._anchors: dict[torch.dtype, object] = {}

    def hf(self, dtype: torch.dtype):
        if dtype not in self._hf:
            self._hf[dtype] = build_hf(self.size, self.device, dtype, self.seed)
        return self._hf[dtype]

    def llama(self, dtype: torch.dtype):
        """(the HF Llama of build_hf_llama, a bridge over its tensors)."""
        if dtype not in self._llamas:
            hf = build_hf_llama(self.size, self.device, dtype, self.seed)
            self._llamas[dtype] = (hf, fb.Bridge.from_hf(hf))
        return self._llamas[dtype]

    def hf_eager(self, dtype: torch.dtype):
        key = (dtype, "eager")
        if key not in self._twins:
            self._twins[key] = hf_twin(self.hf(dtype), "eager")
        return self._twins[key]

    def bridge(self, dtype: torch.dtype) -> fb.Bridge:
        if dtype not in self._bridges:
            self._bridges[dtype] = fb.Bridge.from_hf(self.hf(dtype))
        return self._bridges[dtype]

    def anchor(self, dtype: torch.dtype):
        """HookedTransformer over the same weights (raises ImportError without TransformerLens)."""
        if dtype not in self._anchors:
            from .anchors import hooked_transformer

            self._anchors[dtype] = hooked_transformer(self.hf(dtype))
        return self._anchors[dtype]
