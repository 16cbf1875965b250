"""TransformerBridge's ``enable_compatibility_mode``: HookedTransformer's weight processing,
applied to a Bridge's own leaves in place.

Everything is computed first, by the pure ``fb.process_weights`` on the current leaves; only
then are the leaves written (``copy_`` into the same Parameter objects, so an optimizer built
earlier keeps stepping them). An error raises before the first write, leaving nothing changed.
Processing may need leaves the HF layout has no slot for (GPT-2's ``unembed.b_U``, an untied
``lm_head.weight``); those are registered as new leaves, which an optimizer built earlier does
not hold. The Bridge's hook names need no aliasing: they are HookedTransformer's already.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..params import check_params
from ..processing import process_weights


def enable_compatibility_mode(
    bridge,
    disable_warnings: bool = False,
    no_processing: bool = False,
    fold_ln: bool = True,
    center_writing_weights: bool = True,
    center_unembed: bool = True,
    fold_value_biases: bool = True,
    refactor_factored_attn_matrices: bool = False,
) -> None:
    """Process the bridge's weights as HookedTransformer.from_pretrained does (TL 4's
    TransformerBridge.enable_compatibility_mode options); no_processing=True changes nothing.
    A second processing is skipped with a warning, as TransformerBridge's."""
    if no_processing:
        bridge._tl_compatibility_mode = True
        return
    if getattr(bridge, "_weights_processed", False):
        if not disable_warnings:
            logging.warning("enable_compatibility_mode: this Bridge's weights are already processed; skipping")
        return
    own = bridge.params
    with torch.no_grad():
        new = process_weights(
            own, bridge._config, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
            center_unembed=center_unembed, fold_value_biases=fold_value_biases,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
        )  # fmt: skip
        check_params(new, bridge._config)
        for name, value in new.items():
            if name in own and (value.shape != own[name].shape or value.dtype != own[name].dtype):
                raise RuntimeError(f"processing changed {name}'s shape or dtype; nothing was written")
        trainable = any(leaf.requires_grad for leaf in own.values())
        for name, value in new.items():  # the first write: nothing above raised
            if name in own:
                own[name].copy_(value)
            else:
                bridge._register_leaf(name, nn.Parameter(value, requires_grad=trainable))
    bridge._weights_processed = True
    bridge._tl_compatibility_mode = True
