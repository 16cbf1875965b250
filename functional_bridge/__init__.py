"""functional_bridge: HF transformers with TransformerLens's view, as pure torch.func functions.

One pytree of HF leaf tensors is the only state; TransformerLens-format weights and the forward
pass are pure functions of it.
"""

from . import analysis
from .analysis import ActivationCache, FactoredMatrix, SVDInterpreter, composition_scores
from .architectures import UnsupportedArchitectureError, config_from_hf, supported_architectures
from .bridge import Bridge
from .config import BridgeConfig
from .editing import set_tl_weights
from . import patching
from . import sae
from . import utils
from .func import activation_grads, masked_lm_loss, next_token_loss, per_example_grads, with_activation
from .hooks import HookPoint, hook_names
from .kv_cache import KVCache, empty_kv_cache, forward_with_kv_cache
from .generate import generate_tokens, sample_logits
from .generation_cache import generate_with_cache
from .model import forward, run_with_cache, run_with_hooks
from .processing import process_weights
from .params import ParamsStructureError, check_params, stack_params, unstack_params
from .weights import tl_weights

__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "SVDInterpreter",
    "analysis",
    "composition_scores",
    "Bridge",
    "process_weights",
    "set_tl_weights",
    "BridgeConfig",
    "HookPoint",
    "KVCache",
    "empty_kv_cache",
    "forward_with_kv_cache",
    "generate_tokens",
    "generate_with_cache",
    "sample_logits",
    "ParamsStructureError",
    "UnsupportedArchitectureError",
    "activation_grads",
    "masked_lm_loss",
    "next_token_loss",
    "patching",
    "sae",
    "utils",
    "per_example_grads",
    "with_activation",
    "check_params",
    "config_from_hf",
    "forward",
    "hook_names",
    "run_with_cache",
    "run_with_hooks",
    "stack_params",
    "supported_architectures",
    "tl_weights",
    "unstack_params",
]
