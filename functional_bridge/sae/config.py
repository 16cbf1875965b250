"""SAEConfig: what an SAE or transcoder is (architecture, sizes, conventions, where it reads and
writes), in SAELens 6's vocabulary, and its cfg.json dictionary form.

A frozen dataclass, a static argument of the pure encode/decode (tensors live in the params
pytree, params.py). Conventions, as SAELens 6.54:

- ``apply_b_dec_to_input``: encode subtracts b_dec from its input (SAEs only; a transcoder's
  b_dec lives in the output space, and SAELens refuses the flag for transcoders).
- ``reshape_activations="hook_z"``: the SAE reads ``attn.hook_z`` [..., n_heads, d_head]
  flattened to [..., n_heads * d_head] and decode gives the heads back.
- TopK with ``rescale_acts_by_decoder_norm``: pre-activations are scaled by the decoder row
  norms before the k are chosen, and divided by them again before decoding.
- ``normalize_activations``: at inference SAELens applies only "layer_norm" and
  "constant_norm_rescale" (everything else is the identity); those two keep state between
  encode and decode and are refused here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

SAE_ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
ARCHITECTURES = SAE_ARCHITECTURES + TRANSCODER_ARCHITECTURES
_STATEFUL_NORMS = ("layer_norm", "constant_norm_rescale")
_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
FORMAT_VERSION = "6.0.0"  # the SAELens version whose cfg.json layout this writes
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SAEConfig:
    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None = None  # where it reads (SAELens's cfg.metadata.hook_name)
    d_out: int | None = None  # transcoders only; SAEs write back d_in
    hook_name_out: str | None = None  # transcoders: where they write (None: hook_name)
    apply_b_dec_to_input: bool = True
    reshape_activations: str = "none"  # or "hook_z"
    normalize_activations: str = "none"
    k: int | None = None  # topk only
    rescale_acts_by_decoder_norm: bool = False  # topk only
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)  # the rest of cfg.json's metadata

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported SAE architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.is_transcoder:
            if self.d_out is None:
                raise ValueError(f"a {self.architecture} needs d_out")
            if self.apply_b_dec_to_input:
                raise ValueError("apply_b_dec_to_input is not supported for transcoders (b_dec is in the output space)")
        elif self.d_out not in (None, self.d_in):
            raise ValueError(f"an SAE writes back where it reads: d_out must be None or d_in, got {self.d_out}")
        if self.architecture == "topk" and (not isinstance(self.k, int) or not 0 < self.k <= self.d_sae):
            raise ValueError(f"a topk SAE needs 0 < k <= d_sae ({self.d_sae}), got k={self.k!r}")
        if self.reshape_activations not in ("none", "hook_z"):
            raise ValueError(f"reshape_activations must be 'none' or 'hook_z', got {self.reshape_activations!r}")
        if self.reshape_activations == "hook_z" and self.is_transcoder:
            raise ValueError("reshape_activations='hook_z' is for SAEs: SAELens's transcoders never flatten heads")
        if self.reshape_activations == "hook_z" and self.hook_name is not None and not self.hook_name.endswith("_z"):
            raise ValueError(f"reshape_activations='hook_z' needs a hook_z hook, got hook_name={self.hook_name!r}")
        if self.normalize_activations in _STATEFUL_NORMS:
            raise NotImplementedError(
                f"normalize_activations={self.normalize_activations!r} keeps per-call state between encode and decode "
                "in SAELens; not supported (fold the normalization into the weights)"
            )
        if self.normalize_activations not in _IDENTITY_NORMS:
            raise ValueError(f"unknown normalize_activations {self.normalize_activations!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODER_ARCHITECTURES

    @property
    def has_skip(self) -> bool:
        return self.architecture.endswith("skip_transcoder")

    @property
    def output_dim(self) -> int:
        return self.d_out if self.is_transcoder else self.d_in

    @property
    def output_hook(self) -> str | None:
        return self.hook_name_out or self.hook_name

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **changes) -> "SAEConfig":
        return dataclasses.replace(self, **changes)

    # cfg.json ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """SAELens 6's cfg.json: the config fields, "architecture", and "metadata" (hook names)."""
        out = {"architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae, "dtype": self.dtype,
               "device": "cpu", "apply_b_dec_to_input": self.apply_b_dec_to_input,
               "normalize_activations": self.normalize_activations, "reshape_activations": self.reshape_activations}  # fmt: skip
        if self.is_transcoder:
            out["d_out"] = self.d_out
        if self.architecture == "topk":
            out["k"] = self.k
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        metadata = {"sae_lens_version": FORMAT_VERSION, **self.metadata}  # SAELens reads pre-6 files without it
        metadata["hook_name"] = self.hook_name
        if self.hook_name_out is not None:
            metadata["hook_name_out"] = self.hook_name_out
        out["metadata"] = metadata
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        """From SAELens 6's cfg.json dictionary (pre-6 files, with a top-level hook_point/hook_name
        and no metadata, are read too)."""
        d = dict(d)
        metadata = dict(d.get("metadata") or {})
        hook_name = metadata.pop("hook_name", None) or d.get("hook_name") or d.get("hook_point")
        hook_name_out = metadata.pop("hook_name_out", None) or d.get("hook_name_out")
        architecture = d.get("architecture", "standard")
        if d.get("activation_fn") == "topk" and architecture == "standard":  # SAELens's pre-6 defaulting
            architecture, d["k"] = "topk", (d.get("activation_fn_kwargs") or {}).get("k")
        norm = d.get("normalize_activations", "none")
        if isinstance(norm, bool):
            norm = "expected_average_only_in" if norm else "none"
        reshape = d.get("reshape_activations") or ("hook_z" if hook_name and "hook_z" in hook_name else "none")
        transcoder = architecture in TRANSCODER_ARCHITECTURES
        return cls(
            architecture=architecture, d_in=int(d["d_in"]), d_sae=int(d["d_sae"]), hook_name=hook_name,
            d_out=int(d["d_out"]) if transcoder and d.get("d_out") is not None else None, hook_name_out=hook_name_out,
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", not transcoder)), reshape_activations=reshape,
            normalize_activations=norm, k=d.get("k") if architecture == "topk" else None,
            rescale_acts_by_decoder_norm=bool(d.get("rescale_acts_by_decoder_norm", False)),
            dtype=str(d.get("dtype", "float32")).removeprefix("torch."), metadata=metadata,
        )  # fmt: skip
