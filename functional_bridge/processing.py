"""TransformerLens's weight processing as a pure function params -> params, HF layout kept.

Each option is a small pure function on a TL state (TL name -> tensor, as HookedTransformer's
state dict), with the arithmetic and order of TL 3.9's ``ProcessWeights.process_weights``:
fold_layer_norm, center_writing_weights, center_unembed, fold_value_biases (then b_O recentred),
refactor_factored_attn_matrices. The changed TL weights are written back through the family's
TL->HF inverse (``editing.set_tl_weights``), so every HF leaf keeps its name and shape; where the
HF layout has no slot (centring GPT-2's tied embedding unties the unembedding; folding
``ln_final``'s bias needs an unembedding bias), a declared extra leaf is added
(``lm_head.weight``, ``unembed.b_U``).

Folded norms keep their leaves, set to the identity (w = 1, b = 0): a LayerNorm with those
weights is TL's LNPre. RMS models fold only the norm weights; centring needs LayerNorm, as in TL.
16-bit weights are processed in float32 and cast back, as TL does. As TL, options that would
change the model are skipped with a warning: fold_ln and center_writing_weights where norms sit
on sublayer outputs or residual sums (OLMo 2, OPT's post-LN), behind OPT's embedding projections, or
where the residual starts at the norm's output (BLOOM's apply_residual_connection_post_layernorm),
center_unembed under a final-logit soft cap (Gemma 2), whose tanh is not shift-invariant.
"""

from __future__ import annotations

import warnings

import einops
import torch
from torch import Tensor

from .architectures import family_for
from .config import BridgeConfig
from .editing import present_extras, set_tl_weights
from .params import Params, check_params
from .tl_layout import tl_layout

State = dict[str, Tensor]  # TL name -> tensor


def process_weights(
    params: Params,
    cfg: BridgeConfig,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> dict[str, Tensor]:
    """New params processed as HookedTransformer.load_and_process_state_dict does; pure."""
    refusal = family_for(cfg).no_processing
    if refusal is not None:
        raise ValueError(f"weight processing is not defined for {cfg.original_architecture}: {refusal}")
    if refactor_factored_attn_matrices and cfg.positional_embedding_type == "rotary":
        raise ValueError(
            "refactor_factored_attn_matrices is not defined with rotary embeddings: the QK matrix "
            "depends on the query and key positions (TransformerLens refuses too)"
        )
    check_params(params, cfg)
    fold_ln, center_writing_weights, center_unembed = _applicable(cfg, fold_ln, center_writing_weights, center_unembed)
    start = tl_state(params, cfg)
    state = dict(start)
    layer_norm = cfg.normalization_type == "LN"
    if fold_ln:
        layout = tl_layout(cfg, present_extras(params, cfg))
        unit = [key for key in layout.shapes if key.endswith(".w") and key not in layout.backed and key not in layout.derived]
        state = fold_layer_norm(state, cfg, fold_biases=layer_norm, center_weights=layer_norm, unit_norms=unit)
    if center_writing_weights and layer_norm:
        state = center_writing_weights_(state, cfg)
    if center_unembed:
        state = center_unembed_(state)
    if fold_value_biases:
        state = fold_value_biases_(state, cfg)
        if center_writing_weights and layer_norm:
            state = center_attention_output_bias(state, cfg)
    if refactor_factored_attn_matrices:
        state = refactor_factored_attn_matrices_(state, cfg)
    changed = {key: value for key, value in state.items() if start.get(key) is not value}
    layout = tl_layout(cfg, present_extras(params, cfg))
    for key, source in layout.derived.items():  # a tied W_U stays W_U when W_E is centred
        if key in state and source in changed:
            changed[key] = state[key]
    out = set_tl_weights(params, cfg, changed)
    return {name: value.clone() if value is params.get(name) else value for name, value in out.items()}


def _applicable(cfg: BridgeConfig, fold_ln: bool, center_writing: bool, center_unembed: bool) -> tuple[bool, bool, bool]:
    """The options that keep this model's function, warning about each requested one that would not."""
    arch = cfg.original_architecture
    reasons = []  # why folding or centring the norms would change this model; the first is said
    if cfg.norm_placement in ("output", "post_residual"):
        reasons.append("norms are not on the sublayer inputs")
    if cfg.word_embed_proj_dim is not None:
        reasons.append("project_in/project_out sit between the embedding, the final norm and the unembedding")
    if cfg.residual_from_norm:
        reasons.append("residual branches start at the norms' outputs (apply_residual_connection_post_layernorm)")
    if reasons:
        for name, requested in (("fold_ln", fold_ln), ("center_writing_weights", center_writing)):
            if requested:
                warnings.warn(f"{name} skipped: {arch}'s {reasons[0]}, so it would change the model")
        fold_ln = center_writing = False
    if center_unembed and cfg.output_logits_soft_cap is not None:
        warnings.warn(f"center_unembed skipped: {arch}'s final-logit soft cap is not invariant to shifting the logits")
        center_unembed = False
    return fold_ln, center_writing, center_unembed


def tl_state(params: Params, cfg: BridgeConfig) -> State:
    """HookedTransformer's state dict for these params: the TL view without constants (biases HF
    lacks are absent, not zeros) and without derived keys, except those an extra leaf can hold
    separately (a tied W_U is its own parameter in TL). 16-bit tensors are upcast to float32."""
    layout = tl_layout(cfg, present_extras(params, cfg))
    tl = family_for(cfg).tl_weights(params, cfg)
    keep = [key for key in tl if key in layout.backed and (key not in layout.derived or key in layout.extra_for)]
    return {key: _upcast(tl[key]) for key in keep}


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _attn(state: State, layer: int, name: str) -> str:
    """The key of an attention weight: grouped-query K/V live under _W_K, _b_V ... as in TL."""
    key = f"blocks.{layer}.attn.{name}"
    underscored = f"blocks.{layer}.attn._{name}"
    return underscored if underscored in state else key


def fold_layer_norm(
    state: State, cfg: BridgeConfig, *, fold_biases: bool = True, center_weights: bool = True, unit_norms=()
) -> State:
    """Fold each norm's weight (and bias) into the weights that read it; norms become identity.
    unit_norms: TL weight keys of norms without weights (OLMo's: TL's w = 1), which fold as ones
    (so the weights reading a LayerNorm are centred, as TL does) and stay out of the result."""
    s = dict(state)
    like = s["embed.W_E"]
    s.update({key: like.new_ones(cfg.d_model) for key in unit_norms})
    for layer in range(cfg.n_layers):
        t = f"blocks.{layer}."
        ln1_w = s.get(t + "ln1.w")  # [d_model]
        ln1_b = s.get(t + "ln1.b") if fold_biases else None
        if ln1_w is not None:
            for X in "QKV":
                w_key, b_key = _attn(s, layer, "W_" + X), _attn(s, layer, "b_" + X)
                W = s[w_key]  # [head, d_model, d_head]
                if ln1_b is not None:
                    b = s.get(b_key, W.new_zeros(W.shape[0], W.shape[2]))  # [head, d_head]
                    s[b_key] = b + (W * ln1_b[None, :, None]).sum(-2)
                W = W * ln1_w[None, :, None]
                if center_weights:
                    W = W - einops.reduce(W, "head_index d_model d_head -> head_index 1 d_head", "mean")
                s[w_key] = W
            s[t + "ln1.w"] = torch.ones_like(ln1_w)
            if ln1_b is not None:
                s[t + "ln1.b"] = torch.zeros_like(ln1_b)
        if t + "ln2.w" in s:
            s = _fold_mlp_norm(s, cfg, layer, s[t + "ln2.w"], s.get(t + "ln2.b") if fold_biases else None, "ln2", center_weights)
        elif cfg.parallel_attn_mlp and ln1_w is not None:  # the MLP reads ln1 (GPT-J)
            s = _fold_mlp_norm(s, cfg, layer, ln1_w, ln1_b, None, center_weights)
        elif center_weights and t + "mlp.W_in" in s:
            s[t + "mlp.W_in"] = s[t + "mlp.W_in"] - s[t + "mlp.W_in"].mean(0, keepdim=True)
    ln_w = s.get("ln_final.w")
    ln_b = s.get("ln_final.b") if fold_biases else None
    if ln_b is not None:  # b_U += ln_final.b @ W_U, an unembedding bias GPT-2's HF class lacks
        contribution = (s["unembed.W_U"] * ln_b[:, None]).sum(dim=-2)  # [d_vocab_out]
        b_U = s.get("unembed.b_U")
        s["unembed.b_U"] = contribution if b_U is None else b_U + contribution
        s["ln_final.b"] = torch.zeros_like(ln_b)
    if ln_w is not None:
        W_U = s["unembed.W_U"] * ln_w[:, None]  # [d_model, d_vocab_out]
        s["ln_final.w"] = torch.ones_like(ln_w)
        if center_weights:
            W_U = W_U - W_U.mean(0, keepdim=True)
        s["unembed.W_U"] = W_U
    for key in unit_norms:
        del s[key]
    return s


def _fold_mlp_norm(s: State, cfg: BridgeConfig, layer: int, w: Tensor, b: Tensor | None, name, center: bool) -> State:
    """Fold a norm (w, b: [d_model]) into W_in (and W_gate); name: the norm's TL prefix, or None
    when it is ln1, already set to identity."""
    t = f"blocks.{layer}."
    if cfg.num_experts is not None:
        return _fold_moe_norm(s, cfg, layer, w, b, name)
    W_in = s[t + "mlp.W_in"]  # [d_model, d_mlp]
    if b is not None:
        folded = (W_in * b[:, None]).sum(-2)  # [d_mlp]
        s[t + "mlp.b_in"] = s[t + "mlp.b_in"] + folded if t + "mlp.b_in" in s else folded
        if name is not None:
            s[t + name + ".b"] = torch.zeros_like(b)
    s[t + "mlp.W_in"] = W_in * w[:, None]
    if cfg.gated_mlp and t + "mlp.W_gate" in s:
        W_gate = s[t + "mlp.W_gate"]  # [d_model, d_mlp]
        s[t + "mlp.W_gate"] = W_gate * w[:, None]
        if b is not None:
            folded = (W_gate * b[:, None]).sum(-2)
            s[t + "mlp.b_gate"] = s[t + "mlp.b_gate"] + folded if t + "mlp.b_gate" in s else folded
    if name is not None:
        s[t + name + ".w"] = torch.ones_like(w)
    if center:
        s[t + "mlp.W_in"] = s[t + "mlp.W_in"] - s[t + "mlp.W_in"].mean(0, keepdim=True)
    return s


def _fold_moe_norm(s: State, cfg: BridgeConfig, layer: int, w: Tensor, b: Tensor | None, name) -> State:
    """A norm's weight folded into everything that reads it in a mixture of experts, as TL does:
    the router and every expert's W_gate and W_in (nn.Linear layout, [out, d_model]). No
    mixture-of-experts family has a norm bias to fold."""
    if b is not None:
        raise ValueError(f"{cfg.original_architecture}: folding a norm bias into a mixture of experts is not supported")
    t = f"blocks.{layer}.mlp."
    keys = [t + "W_gate.weight"] + [f"{t}experts.{e}.{W}.weight" for e in range(cfg.num_experts) for W in ("W_gate", "W_in")]
    s.update({key: s[key] * w[None, :] for key in keys})
    if name is not None:
        s[f"blocks.{layer}.{name}.w"] = torch.ones_like(w)
    return s


def center_writing_weights_(state: State, cfg: BridgeConfig) -> State:
    """Remove the mean over d_model from everything that writes to the residual stream."""
    s = dict(state)
    s["embed.W_E"] = s["embed.W_E"] - s["embed.W_E"].mean(-1, keepdim=True)
    if "pos_embed.W_pos" in s and cfg.positional_embedding_type != "rotary":
        s["pos_embed.W_pos"] = s["pos_embed.W_pos"] - s["pos_embed.W_pos"].mean(-1, keepdim=True)
    for layer in range(cfg.n_layers):
        t = f"blocks.{layer}."
        for W, b in (("attn.W_O", "attn.b_O"), ("mlp.W_out", "mlp.b_out")):
            if t + W in s:
                s[t + W] = s[t + W] - s[t + W].mean(-1, keepdim=True)  # [..., d_model]
                if t + b in s:
                    s[t + b] = s[t + b] - s[t + b].mean()
    return s


def center_unembed_(state: State) -> State:
    """Remove the mean over the vocabulary from W_U (and b_U): logits shift, log-probs do not."""
    s = dict(state)
    s["unembed.W_U"] = s["unembed.W_U"] - s["unembed.W_U"].mean(-1, keepdim=True)
    if "unembed.b_U" in s:
        s["unembed.b_U"] = s["unembed.b_U"] - s["unembed.b_U"].mean()
    return s


def fold_value_biases_(state: State, cfg: BridgeConfig) -> State:
    """b_O += sum over heads of b_V @ W_O (patterns sum to 1); b_V becomes zero."""
    s = dict(state)
    for layer in range(cfg.n_layers):
        b_key = _attn(s, layer, "b_V")
        if b_key not in s:
            continue
        b_V = s[b_key]  # [head or kv_head, d_head]
        W_O = s[f"blocks.{layer}.attn.W_O"]  # [head, d_head, d_model]
        repeated = torch.repeat_interleave(b_V, dim=0, repeats=cfg.n_heads // b_V.shape[0])
        b_O = s.get(f"blocks.{layer}.attn.b_O", W_O.new_zeros(cfg.d_model))
        s[f"blocks.{layer}.attn.b_O"] = b_O + (repeated[:, :, None] * W_O).sum([0, 1])
        s[b_key] = torch.zeros_like(b_V)
    return s


def center_attention_output_bias(state: State, cfg: BridgeConfig) -> State:
    s = dict(state)
    for layer in range(cfg.n_layers):
        key = f"blocks.{layer}.attn.b_O"
        if key in s:
            s[key] = s[key] - s[key].mean()
    return s


def refactor_factored_attn_matrices_(state: State, cfg: BridgeConfig) -> State:
    """Rebalance W_Q/W_K (and biases) into an even SVD factorisation of W_QK, and W_V/W_O into
    W_V = U S, W_O = V^T; b_V is folded into b_O. TL 3.9's arithmetic."""
    s = dict(state)
    for layer in range(cfg.n_layers):
        t = f"blocks.{layer}.attn."
        if t + "_W_K" in s:
            raise ValueError("refactor_factored_attn_matrices does not support grouped-query attention (nor does TransformerLens)")
        W_Q, W_K = s[t + "W_Q"], s[t + "W_K"]  # [head, d_model, d_head]
        b_Q = s.get(t + "b_Q", W_Q.new_zeros(W_Q.shape[0], W_Q.shape[2]))
        b_K = s.get(t + "b_K", W_K.new_zeros(W_K.shape[0], W_K.shape[2]))
        W_Q_eff = torch.cat([W_Q, b_Q[:, None, :]], dim=1)  # [head, d_model + 1, d_head]
        W_K_eff = torch.cat([W_K, b_K[:, None, :]], dim=1)
        U, S, V = _factored_svd(W_Q_eff, W_K_eff.transpose(-1, -2))
        W_Q_even = U * S.sqrt()[..., None, :]
        W_K_even = (S.sqrt()[..., :, None] * V.transpose(-1, -2)).transpose(-1, -2)
        s[t + "W_Q"], s[t + "b_Q"] = W_Q_even[:, :-1, :], W_Q_even[:, -1, :]
        s[t + "W_K"], s[t + "b_K"] = W_K_even[:, :-1, :], W_K_even[:, -1, :]
        W_V, W_O = s[t + "W_V"], s[t + "W_O"]
        b_V = s.get(t + "b_V", W_V.new_zeros(W_V.shape[0], W_V.shape[2]))
        b_O = s.get(t + "b_O", W_O.new_zeros(cfg.d_model))
        s[t + "b_V"] = torch.zeros_like(b_V)
        s[t + "b_O"] = b_O + (b_V[:, :, None] * W_O).sum(1).sum(0)
        U, S, V = _factored_svd(W_V, W_O)
        s[t + "W_V"] = U @ S.diag_embed()  # [head, d_model, d_head]
        s[t + "W_O"] = V.transpose(-1, -2)  # [head, d_head, d_model]
    return s


def _factored_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD (U, S, V) of A @ B without forming it: TL's FactoredMatrix.svd, op for op."""
    Ua, Sa, Vha = torch.linalg.svd(A, full_matrices=False)
    Ub, Sb, Vhb = torch.linalg.svd(B, full_matrices=False)
    Va, Vb = Vha.transpose(-1, -2), Vhb.transpose(-1, -2)
    middle = Sa[..., :, None] * Va.transpose(-1, -2) @ Ub * Sb[..., None, :]
    Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
    return Ua @ Um, Sm, Vb @ Vhm.transpose(-1, -2)
