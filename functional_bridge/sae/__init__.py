"""Sparse autoencoders and transcoders as data and pure functions, spliced into a Bridge as hooks.

- config.py: SAEConfig (SAELens 6's fields and conventions, cfg.json form)
- params.py: the params pytree (SAELens's state-dict names), checks, random init, stacking
- codec.py: pure encode / decode / forward
- sae.py: the SAE object, from_sae_lens / to_sae_lens
- io.py: SAELens's saved folder format (load_sae / save_sae)
- splice.py: SAEs spliced into the pure forward as a per-call hook layer, the spliced hook names
- run.py: the pure API of a spliced model (forward_with_saes, run_with_cache_with_saes, activation grads)
- features.py: vmapped feature sweeps (ablation, steering) and stacked SAEs
- stream.py: activations for SAE training
- facade.py: HookedSAETransformer's API on the Bridge (add_sae, run_with_saes, ...)
"""

from .config import ARCHITECTURES, SAEConfig
from .codec import decode, encode, forward
from .io import load_sae, save_sae
from .params import SAEParams, check_sae_params, init_sae_params, leaf_shapes, stack
from .sae import SAE, as_sae, from_sae_lens, to_sae_lens
from .run import activation_grads_with_saes, forward_with_saes, run_with_cache_with_saes
from .features import feature_sweep, stacked_forward
from .stream import stream_activations

__all__ = [
    "ARCHITECTURES", "SAE", "SAEConfig", "SAEParams", "as_sae", "check_sae_params", "decode", "encode", "forward",
    "from_sae_lens", "init_sae_params", "leaf_shapes", "load_sae", "save_sae", "stack", "to_sae_lens",
    "activation_grads_with_saes", "forward_with_saes", "run_with_cache_with_saes", "feature_sweep", "stacked_forward",
    "stream_activations",
]  # fmt: skip
