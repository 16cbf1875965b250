"""TransformerLens compatibility: what a HookedTransformer keeps on the model (a tokenizer,
registered hooks, config flags), kept on the Bridge facade and passed into the pure functions
on every call. TLFacade is mixed into Bridge; the pieces are in this package's modules."""

from .config import TLConfig, TLState
from .facade import TLFacade
from .forward import Output, tl_forward
from .registry import FacadeHookPoint, HookRegistry, LensHandle

__all__ = ["FacadeHookPoint", "HookRegistry", "LensHandle", "Output", "TLConfig", "TLFacade", "TLState", "tl_forward"]
