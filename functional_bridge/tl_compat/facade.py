"""TLFacade: what makes a Bridge answer like HookedTransformer 3.9.

Mixed into Bridge. It holds the state TransformerLens keeps on the model (a tokenizer, TLState,
registered hooks) and turns it into arguments of the pure functions on every call:
``bridge(input, return_type=..., ...)`` is HookedTransformer.forward over ``fb.forward``;
``bridge.cfg`` answers TL's config fields (config.py); ``bridge.blocks[i].attn.W_Q`` and friends
are views derived from the leaves (views.py); text methods are in text.py, the hook API in
hooking.py, ``enable_compatibility_mode`` in compat_mode.py.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..analysis.residual import accumulated_bias
from ..weights import tl_weights
from . import compat_mode
from . import encoder_text as enc
from .config import TLConfig, TLState, plain_config
from .forward import tl_forward
from .generation import TLGenerateMixin
from .hooking import TLHooksMixin
from .text import TLTextMixin
from .tokens import default_prepend_bos
from .views import BlockList, TLView


class TLFacade(TLTextMixin, TLHooksMixin, TLGenerateMixin):
    def _init_tl(self, tokenizer=None, prepend_bos: bool | None = None, padding_side: str | None = None) -> None:
        """Facade state for a new Bridge (called by Bridge.__init__)."""
        if self._is_encoder:  # HookedEncoder: no BOS by hand, padding on the right
            enc.check_encoder_text_options(
                self._config.original_architecture, prepend_bos, padding_side, "default_padding_side", "default_prepend_bos"
            )  # fmt: skip
            prepend = False
        else:
            prepend = default_prepend_bos(self._config.original_architecture) if prepend_bos is None else bool(prepend_bos)
        self._tl = TLState(default_prepend_bos=prepend)
        if tokenizer is not None:
            self.set_tokenizer(tokenizer, padding_side)

    # the config ----------------------------------------------------------------------------------

    @property
    def cfg(self) -> TLConfig:
        """The BridgeConfig, bound to this Bridge so that it also answers TransformerLens's
        fields (device and dtype read off the leaves); a static argument for fb.forward."""
        live = self.__dict__.get("_tl_cfg")
        if type(live) is not TLConfig or live.__dict__["_owner"]() is not self:
            live = self.__dict__["_tl_cfg"] = TLConfig.bind(self._config, self)
        return live

    @cfg.setter
    def cfg(self, cfg) -> None:
        self.__dict__["_config"] = plain_config(cfg)
        self.__dict__.pop("_tl_cfg", None)

    # the forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input,
        return_type: str | None = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        tokens: Tensor | None = None,
        shortformer_pos_embed: Tensor | None = None,
        attention_mask: Tensor | None = None,
        stop_at_layer: int | None = None,
        past_kv_cache=None,
        *,
        hooks=None,
        token_type_ids: Tensor | None = None,
        one_zero_attention_mask: Tensor | None = None,
    ):
        """HookedTransformer.forward: input is text, a list of texts (padded, with its padding
        mask), token ids [batch, pos] or [pos], or with start_at_layer the residual stream
        [batch, pos, d_model] entering that block. Returns logits [batch, pos, d_vocab_out] (the
        default), the loss, Output(logits, loss), None, or with stop_at_layer the residual stream.
        The loss ignores padding (see tl_compat.forward.tl_forward). hooks: per-call
        ``[(name or predicate, fn)]``, run after the registered ones. Equal to
        ``fb.forward(bridge.params, tokens, bridge.cfg)`` for token ids without hooks.
        token_type_ids: an encoder's (BERT's) segment ids.

        An encoder (BERT) answers as HookedEncoder.forward(input, return_type, token_type_ids,
        one_zero_attention_mask): text gets the tokenizer's token types and mask (those passed
        win); return_type is "logits", None (the forward runs, hooks fire, None is returned) or
        "predictions" (the most likely token at each mask token: encoder_text.mlm_predictions);
        "loss" and "both" are refused (a masked-LM loss needs labels: fb.masked_lm_loss).
        one_zero_attention_mask is HookedEncoder's name for attention_mask, and HookedEncoder's
        positional order is accepted (a tensor third is token_type_ids, fourth the mask)."""
        if self._is_encoder:
            loss_per_token, prepend_bos, token_type_ids, attention_mask = _encoder_arguments(
                loss_per_token, prepend_bos, token_type_ids, attention_mask, one_zero_attention_mask
            )  # fmt: skip
        elif one_zero_attention_mask is not None:
            raise ValueError("one_zero_attention_mask is HookedEncoder's argument (for encoders): pass attention_mask=")
        predictions = return_type == "predictions"
        if predictions:
            if not self._is_encoder:
                raise ValueError(
                    f"return_type='predictions' (HookedEncoder's masked-token answer) is for encoders; "
                    f"{self._config.original_architecture} is a causal LM: use 'logits', 'loss', 'both' or None"
                )
            self._require_tokenizer("return_type='predictions'")
            return_type = "logits"
        if past_kv_cache is not None:
            raise NotImplementedError("past_kv_cache is not supported by Bridge.forward")
        if shortformer_pos_embed is not None:
            raise ValueError("shortformer_pos_embed: no supported architecture uses shortformer positions")
        params = self.params
        if start_at_layer is None:
            x, mask, token_type_ids = self._model_input(input, prepend_bos, padding_side, attention_mask, token_type_ids)
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"with start_at_layer the input is the residual stream (a tensor), got {type(input).__name__}")
            x, mask = input, attention_mask
        out = tl_forward(
            params, self._config, x, self._call_hooks(hooks), attention_mask=mask, return_type=return_type,
            loss_per_token=loss_per_token, start_at_layer=start_at_layer, stop_at_layer=stop_at_layer, tokens=tokens,
            token_type_ids=token_type_ids, run_block=self.__dict__.get("_run_block"),
        )  # fmt: skip
        return enc.mlm_predictions(self.tokenizer, out, x) if predictions else out

    def loss_fn(self, logits: Tensor, tokens: Tensor, attention_mask: Tensor | None = None, per_token: bool = False) -> Tensor:
        """fb.utils.lm_cross_entropy_loss (HookedTransformer.loss_fn)."""
        from ..utils import lm_cross_entropy_loss

        return lm_cross_entropy_loss(logits, tokens.to(logits.device), attention_mask, per_token)

    # HookedTransformer's submodules, as views of the leaves ---------------------------------------

    @property
    def blocks(self) -> BlockList:
        return BlockList(self)

    @property
    def embed(self) -> TLView:
        return TLView(self, "embed")

    @property
    def pos_embed(self) -> TLView:
        if self._config.positional_embedding_type != "standard":
            raise AttributeError(f"{self._config.original_architecture} has no learned positional embedding (pos_embed)")
        return TLView(self, "pos_embed")

    @property
    def unembed(self):
        """The unembedding's TL view (a TLContainer when it also holds an extra leaf, b_U)."""
        container = self._modules.get("unembed")
        return TLView(self, "unembed") if container is None else container

    @property
    def ln_final(self) -> TLView:
        return TLView(self, "ln_final")

    @property
    def hook_embed(self):
        return self._registry.point("hook_embed")

    @property
    def hook_pos_embed(self):
        return self._registry.point("hook_pos_embed")

    @property
    def W_E_pos(self) -> Tensor:
        """[d_vocab + n_ctx, d_model]: W_E and W_pos stacked (learned positions only)."""
        import torch

        return torch.cat([self.W_E, self.W_pos], dim=0)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """[d_model]: the b_O (and b_out) of every block before ``layer`` (plus block ``layer``'s
        b_O with mlp_input), from the current leaves."""
        if not 0 <= layer <= self._config.n_layers:
            raise ValueError(f"layer must be in [0, {self._config.n_layers}], got {layer}")
        return accumulated_bias(tl_weights(self.params, self._config), self._config, layer, mlp_input, include_mlp_biases)

    def all_head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self._config.n_layers) for h in range(self._config.n_heads)]

    @property
    def n_params_total(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # moving and processing -----------------------------------------------------------------------

    def to(self, *args, print_details: bool = False, **kwargs):
        """nn.Module.to in every torch call form; print_details prints what moved, as
        HookedTransformer.to does (by default here it is quiet). cfg.device and cfg.dtype follow
        the leaves by construction."""
        out = nn.Module.to(self, *args, **kwargs)
        if print_details:
            print(f"Moved model to device {self.cfg.device}, dtype {self.cfg.dtype}")
        return out

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False, fold_ln: bool = True,
                                  center_writing_weights: bool = True, center_unembed: bool = True,
                                  fold_value_biases: bool = True, refactor_factored_attn_matrices: bool = False) -> None:  # fmt: skip
        """TransformerBridge's enable_compatibility_mode: HookedTransformer.from_pretrained's
        weight processing on this Bridge's leaves, in place and atomically (tl_compat.compat_mode)."""
        compat_mode.enable_compatibility_mode(
            self, disable_warnings, no_processing, fold_ln, center_writing_weights, center_unembed,
            fold_value_biases, refactor_factored_attn_matrices,
        )  # fmt: skip


def _encoder_arguments(loss_per_token, prepend_bos, token_type_ids, attention_mask, one_zero_attention_mask):
    """An encoder's forward arguments from HookedTransformer's signature: HookedEncoder's
    positional token_type_ids and one_zero_attention_mask land where HookedTransformer has
    loss_per_token and prepend_bos (an encoder has no loss), and one_zero_attention_mask is
    attention_mask. Returns (loss_per_token, prepend_bos, token_type_ids, attention_mask)."""
    if isinstance(loss_per_token, Tensor):
        if token_type_ids is not None:
            raise ValueError("token_type_ids given twice (positionally, as HookedEncoder's third argument, and by name)")
        token_type_ids, loss_per_token = loss_per_token, False
    if isinstance(prepend_bos, Tensor):
        if one_zero_attention_mask is not None:
            raise ValueError("one_zero_attention_mask given twice (positionally, as HookedEncoder's fourth argument, and by name)")
        one_zero_attention_mask, prepend_bos = prepend_bos, None
    if one_zero_attention_mask is not None:
        if attention_mask is not None:
            raise ValueError("pass attention_mask or one_zero_attention_mask (HookedEncoder's name for it), not both")
        attention_mask = one_zero_attention_mask
    return loss_per_token, prepend_bos, token_type_ids, attention_mask
