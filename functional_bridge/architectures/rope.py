"""HF rotary settings -> BridgeConfig's rotary fields, shared by the rotary families.

transformers 5 keeps them in ``config.rope_parameters`` (rope_type, rope_theta,
partial_rotary_factor, scaling keys); 4.x in ``rope_theta`` and ``rope_scaling``. Implemented rope
types: "default", "linear" and "llama3"; any other is refused by name.
"""

from __future__ import annotations

ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf) -> dict:
    """The rope settings of an HF config as one flat dict (rope_type, rope_theta, ...)."""
    params = getattr(hf, "rope_parameters", None)
    if not isinstance(params, dict) or not params:  # transformers 4.x names (NeoX: rotary_*)
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf, "rope_theta", None) or getattr(hf, "rotary_emb_base", 10000.0))
        if getattr(hf, "rotary_pct", None) is not None:
            params.setdefault("partial_rotary_factor", hf.rotary_pct)
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_fields(hf, arch: str, head_dim: int, partial_rotary: bool) -> dict:
    """BridgeConfig rotary fields. partial_rotary: the family rotates only the first
    int(head_dim * partial_rotary_factor) dims (NeoX); otherwise a factor other than 1 is refused."""
    params = rope_parameters(hf)
    rope_type = params["rope_type"]
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{arch} rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    factor = params.get("partial_rotary_factor")
    factor = 1.0 if factor is None else float(factor)
    if not partial_rotary and factor != 1.0:
        raise ValueError(f"{arch} with partial_rotary_factor={factor} is not supported (only 1.0)")
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2 or rotary_dim <= 0:
        raise ValueError(
            f"{arch} rotary dimension int(head_dim * partial_rotary_factor) = {rotary_dim} must be even "
            f"and positive (head_dim={head_dim}, partial_rotary_factor={factor})"
        )
    fields = dict(positional_embedding_type="rotary", rotary_dim=rotary_dim, rotary_base=float(params["rope_theta"]))
    if rope_type == "linear":
        fields["rotary_scaling_factor"] = float(params["factor"])
    elif rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(params["factor"]),
            NTK_by_parts_low_freq_factor=float(params["low_freq_factor"]),
            NTK_by_parts_high_freq_factor=float(params["high_freq_factor"]),
            NTK_original_ctx_len=int(params.get("original_max_position_embeddings", hf.max_position_embeddings)),
        )
    return fields
