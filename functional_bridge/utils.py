"""``fb.utils``: the TransformerLens ``utils`` functions that notebooks use, same names and
semantics as TransformerLens 3.9's (``from functional_bridge import utils`` in place of
``from transformer_lens import utils``).

lm_cross_entropy_loss computes in at least float32 (TransformerLens uses the logits' dtype) and
has no ``.item()`` (so it composes with torch.compile and vmap); otherwise its values are TL's.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .analysis.names import act_name
from .components.precision import upcast

__all__ = [
    "get_act_name", "get_corner", "lm_accuracy", "lm_cross_entropy_loss", "next_token_nll",
    "remove_batch_dim", "test_prompt", "to_numpy",
]  # fmt: skip


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's get_act_name: ("resid_pre", 3) -> "blocks.3.hook_resid_pre", "pattern",
    "k6", ("scale", 2, "ln2")... (a full hook name is returned unchanged)."""
    return act_name(name, layer, layer_type)


def to_numpy(tensor) -> np.ndarray:
    """A tensor (detached, on the CPU; bfloat16 as float32), list, tuple, number or array as numpy."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"to_numpy: invalid type {type(tensor).__name__}")


def get_corner(tensor, n: int = 3):
    """The top-left n x n x ... corner of a tensor (or FactoredMatrix)."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: Tensor) -> Tensor:
    """tensor without its leading dim if that dim has size 1, else unchanged."""
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def next_token_nll(logits: Tensor, tokens: Tensor) -> Tensor:
    """-log p(token i+1 | position i): [batch, pos - 1], in at least float32."""
    log_probs = F.log_softmax(upcast(logits[..., :-1, :]), dim=-1)  # [batch, pos - 1, vocab]
    return -log_probs.gather(-1, tokens[..., 1:, None])[..., 0]


def lm_cross_entropy_loss(
    logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None, per_token: bool = False
) -> Tensor:
    """TransformerLens's next-token cross-entropy: logits [batch, pos, vocab], tokens [batch, pos].
    With attention_mask [batch, pos] (1 = real token), pairs where the position or the next one
    is padding are left out: per_token gives 0 there, the mean divides by the real pairs only.
    per_token: [batch, pos - 1]; else the mean, a scalar."""
    nll = next_token_nll(logits, tokens)
    if attention_mask is None:
        return nll if per_token else nll.mean()
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask must have the shape of tokens, got {tuple(attention_mask.shape)} and {tuple(tokens.shape)}")
    pairs = attention_mask[..., :-1].bool() & attention_mask[..., 1:].bool()  # [batch, pos - 1]
    nll = torch.where(pairs, nll, torch.zeros_like(nll))  # where, not a product: NaN-safe at padding
    return nll if per_token else nll.sum() / pairs.sum()


def lm_accuracy(logits: Tensor, tokens: Tensor, per_token: bool = False) -> Tensor:
    """Top-1 next-token accuracy: [batch, pos - 1] booleans with per_token, else the fraction."""
    correct = logits.argmax(-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def test_prompt(prompt: str, answer, model, prepend_space_to_answer: bool = True, print_details: bool = True,
                prepend_bos: bool | None = None, top_k: int = 10) -> None:  # fmt: skip
    """TransformerLens's test_prompt: print how a model ranks the answer token(s) after a prompt
    (rank, logit, probability) and its top_k tokens. Plain text (TL prints with rich markup)."""
    from .architectures import require_causal_lm

    require_causal_lm(model.cfg, "test_prompt")
    answers = [answer] if isinstance(answer, str) else list(answer)
    multiple = len(answers) > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_tokens = model.to_tokens(answers, prepend_bos=False)
    if multiple:
        answer_tokens = answer_tokens[:, :1]
    tokens = torch.cat((prompt_tokens.repeat(answer_tokens.shape[0], 1), answer_tokens), dim=1)
    prompt_str = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_strs = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    start, length = len(prompt_str), 1 if multiple else len(answer_strs[0])
    if print_details:
        print("Tokenized prompt:", prompt_str)
        print("Tokenized answers:" if multiple else "Tokenized answer:", answer_strs if multiple else answer_strs[0])
    with torch.no_grad():
        logits = model(tokens)
    probs = logits.softmax(-1)
    ranks = []
    for index in range(start, start + length):
        targets = tokens[:, index]
        strs = [a[index - start] for a in answer_strs]
        token_probs = probs[:, index - 1]
        sorted_probs, order = token_probs.sort(descending=True)
        answer_ranks = order.argsort(-1)[range(len(answers)), targets.cpu()].tolist()
        ranks.append(list(zip(strs, answer_ranks)))
        if print_details:
            print(f"Performance on answer token{'s' if multiple else ''}:")
            for i in range(len(answers)):
                t = targets[i]
                print(f"Rank: {answer_ranks[i]: <8} Logit: {logits[i, index - 1, t].item():5.2f} "
                      f"Prob: {token_probs[i, t].item():6.2%} Token: |{strs[i]}|")  # fmt: skip
            for i in range(min(top_k, order.shape[-1])):
                t = order[0, i]
                print(f"Top {i}th token. Logit: {logits[0, index - 1, t].item():5.2f} "
                      f"Prob: {sorted_probs[0, i].item():6.2%} Token: |{model.to_string(t)}|")  # fmt: skip
    print("Ranks of the answer tokens:", [r[0] for r in ranks] if not multiple else ranks)


test_prompt.__test__ = False  # a utility, not a pytest test
