"""TransformerLens's shorthand for hook names: ("resid_pre", 3) -> "blocks.3.hook_resid_pre".

The same mapping as TransformerLens's ``utils.get_act_name``, so ``cache["pattern", 0]``,
``cache["k6"]`` and ``cache["scale4ln1"]`` work as they do on a TransformerLens cache.
"""

from __future__ import annotations

import re

_ATTN = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP = {"pre", "post", "mid", "pre_linear"}
_NORM = {"scale", "normalized"}
_NAME_ALIASES = {
    "attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
    "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post",
}  # fmt: skip
_SUBLAYER_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_COMPACT = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")  # "scale4ln1" -> ("scale", "4", "ln1")


def act_name(name: str, layer: int | str | None = None, sublayer: str | None = None) -> str:
    """The full hook name for a shorthand (a full name is returned unchanged)."""
    if layer is None and sublayer is None and ("." in name or name.startswith("hook_")):
        return name
    compact = _COMPACT.match(name)
    if compact is not None:
        name, layer, sublayer = compact.groups()
    name = _NAME_ALIASES.get(name, name)
    if name in _ATTN:
        sublayer = "attn"
    elif name in _MLP:
        sublayer = "mlp"
    else:
        sublayer = _SUBLAYER_ALIASES.get(sublayer, sublayer)
    parts = [] if layer is None else ["blocks", str(layer)]
    if sublayer:
        parts.append(sublayer)
    elif name in _NORM and layer is None:
        parts.append("ln_final")
    parts.append(f"hook_{name}")
    return ".".join(parts)
