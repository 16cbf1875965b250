"""SVDInterpreter: the top singular vectors of a head's OV (or QK) circuit or an MLP's weights,
read in the vocabulary (TransformerLens's SVDInterpreter, plus QK and top-k tokens).

Weights are read from the model's leaves on every call (``fb.tl_weights``), so the interpreter
is never stale. As in TransformerLens 3.9:
  "OV"    head (layer, head): right singular vectors of W_V W_O (the directions it writes);
  "w_in"  layer: right singular vectors of W_in^T * ln2.w ([d_mlp, d_model]; the directions the
          MLP reads, with the LayerNorm weight folded in when the model has one);
  "w_out" layer: right singular vectors of W_out ([d_mlp, d_model]; the directions it writes);
and each vector v [d_model] is read as v @ W_U (project_out.W @ W_U behind OPT's project_out),
giving [d_vocab_out, 1, num_vectors].
Added here: "QK_query" / "QK_key", the left / right singular vectors of W_Q W_K^T (the residual
directions the query / key side reads), read the same way. ``through="W_E"`` reads vectors
through the token embedding (v @ W_E^T) instead. Singular vectors have arbitrary signs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .circuits import head_weight
from .factored_matrix import FactoredMatrix
from .residual import residual_embed, residual_unembed
from .source import as_model, current_tl_weights

HEAD_VECTOR_TYPES = ("OV", "QK_query", "QK_key")
LAYER_VECTOR_TYPES = ("w_in", "w_out")
VECTOR_TYPES = HEAD_VECTOR_TYPES + LAYER_VECTOR_TYPES


class SVDInterpreter:
    def __init__(self, model, cfg=None, tokenizer=None):
        """model: a Bridge (or a params mapping with cfg=...). tokenizer: optional, for top_tokens."""
        self.model = as_model(model, cfg)
        self.tokenizer = tokenizer

    @property
    def cfg(self):
        return self.model.cfg

    def singular_directions(self, vector_type: str, layer_index: int, num_vectors: int = 10, head_index: int | None = None) -> Tensor:
        """The top num_vectors singular vectors as rows, [num_vectors, d_model]."""
        tl = current_tl_weights(self.model)
        self._check(vector_type, layer_index, head_index, num_vectors)
        if vector_type in HEAD_VECTOR_TYPES:
            if vector_type == "OV":
                circuit = FactoredMatrix(head_weight(tl, self.cfg, layer_index, "W_V")[head_index],
                                         head_weight(tl, self.cfg, layer_index, "W_O")[head_index])  # fmt: skip
            else:
                circuit = FactoredMatrix(head_weight(tl, self.cfg, layer_index, "W_Q")[head_index],
                                         head_weight(tl, self.cfg, layer_index, "W_K")[head_index].T)  # fmt: skip
            U, _, V = circuit.svd()  # [d_model, k] each
            vectors = U if vector_type == "QK_query" else V
            return vectors[:, :num_vectors].T
        matrix = self._mlp_matrix(tl, vector_type, layer_index)  # [d_mlp, d_model]
        return torch.linalg.svd(matrix, full_matrices=False).Vh[:num_vectors]

    def get_singular_vectors(
        self, vector_type: str, layer_index: int, num_vectors: int = 10, head_index: int | None = None, through: str = "W_U"
    ) -> Tensor:
        """The top num_vectors singular vectors read in the vocabulary: [d_vocab_out, 1, num_vectors]
        (TransformerLens's layout), column i = vector i @ W_U (or @ W_E^T with through="W_E")."""
        directions = self.singular_directions(vector_type, layer_index, num_vectors, head_index)
        tl = current_tl_weights(self.model)
        if through == "W_U":  # (through OPT's project_out / project_in where the model has them)
            readout = residual_unembed(tl)  # [d_model, d_vocab_out]
        elif through == "W_E":
            readout = residual_embed(tl).T  # [d_model, d_vocab]
        else:
            raise ValueError(f"through must be 'W_U' or 'W_E', got {through!r}")
        dtype = torch.promote_types(directions.dtype, torch.float32)
        return (directions.to(dtype) @ readout.to(dtype)).T[:, None, :]

    def top_tokens(
        self, vector_type: str, layer_index: int, num_vectors: int = 10, head_index: int | None = None, k: int = 10, through: str = "W_U"
    ):
        """The k tokens each vector reads highest: [num_vectors][k] token ids, or strings if the
        interpreter has a tokenizer. (Negate a vector for its other end: signs are arbitrary.)"""
        scores = self.get_singular_vectors(vector_type, layer_index, num_vectors, head_index, through)[:, 0, :]
        ids = scores.topk(k, dim=0).indices.T  # [num_vectors, k]
        if self.tokenizer is None:
            return ids
        return [[self.tokenizer.decode([i]) for i in row] for row in ids.tolist()]

    def _mlp_matrix(self, tl, vector_type: str, layer: int) -> Tensor:
        if vector_type == "w_out":
            return tl[f"blocks.{layer}.mlp.W_out"]  # [d_mlp, d_model]
        w_in = tl[f"blocks.{layer}.mlp.W_in"].T  # [d_mlp, d_model]
        # [d_model]; absent once LayerNorm is folded, and not on the MLP's input where TL's ln2 is
        # an output norm (OLMo 2) or a norm of the residual sum (post-LN)
        ln2 = tl.get(f"blocks.{layer}.ln2.w") if self.cfg.norm_placement in ("pre", "pre_post") else None
        return w_in if ln2 is None else w_in * ln2

    def _check(self, vector_type, layer, head, num_vectors) -> None:
        if vector_type not in VECTOR_TYPES:
            raise ValueError(f"vector_type must be one of {list(VECTOR_TYPES)}, got {vector_type!r}")
        if not 0 <= layer < self.cfg.n_layers:
            raise ValueError(f"layer_index must be in [0, {self.cfg.n_layers - 1}], got {layer}")
        if vector_type not in HEAD_VECTOR_TYPES and self.cfg.num_experts is not None:
            raise ValueError(f"{vector_type} is per MLP: {self.cfg.original_architecture}'s MLPs are mixtures of experts")
        if vector_type in HEAD_VECTOR_TYPES:
            if head is None or not 0 <= head < self.cfg.n_heads:
                raise ValueError(f"{vector_type} needs head_index in [0, {self.cfg.n_heads - 1}], got {head}")
        bound = self.cfg.d_head if vector_type in HEAD_VECTOR_TYPES else min(self.cfg.d_model, self.cfg.d_mlp)
        if num_vectors > bound:
            raise ValueError(f"{vector_type} has at most {bound} singular vectors, asked for {num_vectors}")
