"""HookedTransformer.forward's arguments over the pure forward: return types, loss, layer ranges.

``tl_forward`` is pure (no tokenizer, no registry): the facade turns text into tokens and a
padding mask, and its registered hooks into a HookSet, then calls it.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from ..architectures import family_for, require_causal_lm
from ..architectures.family import MASKED_LM
from ..config import BridgeConfig
from ..hooks import HookSet
from ..model import check_inputs, check_token_type_ids, transformer
from ..params import Params
from ..utils import lm_cross_entropy_loss

RETURN_TYPES = ("logits", "loss", "both", None)


class Output(NamedTuple):
    """return_type="both": TransformerLens's Output(logits, loss)."""

    logits: Tensor  # [batch, pos, d_vocab_out]
    loss: Tensor  # [] or [batch, pos - 1] with loss_per_token


def tl_forward(
    params: Params,
    cfg: BridgeConfig,
    x: Tensor,
    hooks: HookSet,
    *,
    attention_mask: Tensor | None = None,
    return_type: str | None = "logits",
    loss_per_token: bool = False,
    start_at_layer: int | None = None,
    stop_at_layer: int | None = None,
    tokens: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    run_block=None,
):
    """HookedTransformer.forward on token ids (or, with start_at_layer, the residual stream
    [batch, pos, d_model] entering that block). Returns logits, the loss, Output(logits, loss),
    None (return_type=None: ln_final runs, the unembedding does not), or with stop_at_layer the
    residual stream leaving block stop_at_layer - 1 (whatever return_type says, as TL).

    The loss is TransformerLens's lm_cross_entropy_loss over ``tokens`` (the input tokens unless
    start_at_layer), with attention_mask: next-token pairs touching padding are left out. The
    facade passes the padding mask of every string batch, so padded text never counts in the
    loss (TransformerLens's HookedTransformer builds no mask for right-padded text and averages
    over the padding; TL#1607 is the same bug in its TransformerBridge). run_block: how each block
    runs (model.transformer's; a sharded bridge's, distributed/fsdp.py)."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    encoder = family_for(cfg).kind == MASKED_LM
    if return_type in ("loss", "both"):
        require_causal_lm(cfg, f"return_type={return_type!r} (the next-token loss)",
                          "no next token to predict; for a masked-LM loss use fb.masked_lm_loss(logits, labels, attention_mask)")  # fmt: skip
    residual = start_at_layer is not None
    x, attention_mask = check_inputs(params, x, cfg, attention_mask, residual=residual)
    token_type_ids = None if residual else check_token_type_ids(token_type_ids, x, cfg)  # an encoder's (BERT's)
    if not residual:
        tokens = x
    wants_logits = return_type is not None or stop_at_layer is not None or encoder  # (HookedEncoder runs its head anyway)
    out = transformer(
        params, x, cfg, attention_mask, hooks, token_type_ids,
        start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, unembed=wants_logits, run_block=run_block,
    )  # fmt: skip
    if return_type is None and stop_at_layer is None:
        return None
    if stop_at_layer is not None or return_type == "logits":
        return out
    if tokens is None:
        raise ValueError(f"return_type={return_type!r} with start_at_layer needs the input tokens: pass tokens=")
    if tokens.dim() == 1:
        tokens = tokens[None]
    loss = lm_cross_entropy_loss(out, tokens.to(out.device), attention_mask, per_token=loss_per_token)
    return loss if return_type == "loss" else Output(out, loss)
