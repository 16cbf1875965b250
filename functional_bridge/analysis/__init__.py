"""Analysis over the TL view of the leaves: factored matrices, QK/OV circuits, composition
scores, the SVD interpreter, and the ActivationCache that Bridge.run_with_cache returns.

Every function reads weights through ``fb.tl_weights`` when it is called, never a snapshot.
"""

from .activation_cache import PYTREE_NAMESPACE, ActivationCache
from .circuits import head_weight, ov_circuit, qk_circuit
from .composition import all_composition_scores, composition_scores
from .factored_matrix import FactoredMatrix
from .names import act_name
from .residual import accumulated_bias, tokens_to_residual_directions
from .source import FixedParams
from .svd_interpreter import SVDInterpreter

__all__ = [
    "PYTREE_NAMESPACE",
    "ActivationCache",
    "FactoredMatrix",
    "FixedParams",
    "SVDInterpreter",
    "accumulated_bias",
    "act_name",
    "all_composition_scores",
    "composition_scores",
    "head_weight",
    "ov_circuit",
    "qk_circuit",
    "tokens_to_residual_directions",
]
