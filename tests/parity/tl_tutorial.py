"""A TransformerLens tutorial in miniature (the Main Demo / Exploratory Analysis / Activation
Patching notebooks' steps), written once against HookedTransformer's API.

test_tl_oracle_tutorial.py runs it twice: with ``model`` a HookedTransformer and ``utils``
TransformerLens's, then with ``model`` a functional_bridge Bridge and ``utils`` fb.utils: the
import and the loading line are all that change. It returns the numbers each step produced.
"""

from functools import partial

import torch

PROMPT = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def run_tutorial(model, utils) -> dict:
    out = {}
    torch.set_grad_enabled(False)
    try:
        # text in, tokens and a cache out
        tokens = model.to_tokens(PROMPT)
        str_tokens = model.to_str_tokens(PROMPT)
        assert len(str_tokens) == tokens.shape[1]
        logits, cache = model.run_with_cache(tokens)
        out["logits"] = logits
        out["loss"] = model(PROMPT, return_type="loss")
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads

        # attention patterns, by shorthand and by full name
        out["pattern_last_layer"] = cache["pattern", n_layers - 1]  # [batch, head, query, key]
        out["pattern_layer_0"] = cache[utils.get_act_name("pattern", 0)]
        out["attention_to_bos"] = torch.stack([cache["pattern", layer][0, :, -1, 0] for layer in range(n_layers)])

        # the logit difference " Mary" - " John" and its direction in the residual stream
        answer, wrong = model.to_single_token(" Mary"), model.to_single_token(" John")

        def logit_diff(logits):
            return logits[0, -1, answer] - logits[0, -1, wrong]

        out["logit_diff"] = logit_diff(logits)
        direction = model.tokens_to_residual_directions(answer) - model.tokens_to_residual_directions(wrong)

        # logit lens: the accumulated residual stream, scaled by the final LayerNorm
        accumulated, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
        scaled = cache.apply_ln_to_stack(accumulated, layer=-1, pos_slice=-1)
        out["logit_lens"] = scaled @ direction  # [component, batch]
        out["logit_lens_labels"] = labels

        # direct logit attribution per component and per head
        components, component_labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
        out["dla_components"] = cache.apply_ln_to_stack(components, layer=-1, pos_slice=-1) @ direction
        out["dla_labels"] = component_labels
        heads = cache.stack_head_results(layer=-1, pos_slice=-1)
        out["dla_heads"] = (cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1) @ direction).reshape(n_layers, n_heads)

        # ablating heads with a partial hook that reads hook.layer()
        def ablate_head(z, hook, head):
            if hook.layer() == 0:
                z[:, :, head] = 0.0
            return z

        ablated = model.run_with_hooks(tokens, fwd_hooks=[(lambda name: name.endswith("hook_z"), partial(ablate_head, head=1))])
        out["ablated_logit_diff"] = logit_diff(ablated)

        # activation patching: the clean residual stream at each (layer, position) into the
        # corrupted run
        corrupted_tokens = model.to_tokens(CORRUPTED)
        assert corrupted_tokens.shape == tokens.shape

        def patch_position(resid, hook, position):
            resid[:, position] = cache[hook.name][:, position]
            return resid

        patched = torch.zeros(n_layers, tokens.shape[1])
        for layer in range(n_layers):
            for position in range(tokens.shape[1]):
                hook = (utils.get_act_name("resid_pre", layer), partial(patch_position, position=position))
                patched[layer, position] = logit_diff(model.run_with_hooks(corrupted_tokens, fwd_hooks=[hook]))
        out["patching"] = patched

        # weights, by module path and stacked
        out["W_Q_block_0"] = model.blocks[0].attn.W_Q
        out["W_out_last"] = model.blocks[-1].mlp.W_out
        out["OV_norm"] = model.OV[0, 1].norm()
        out["accumulated_bias"] = model.accumulated_bias(n_layers)
        out["to_numpy"] = torch.tensor(utils.to_numpy(cache["resid_post", 0][0, -1]))
    finally:
        torch.set_grad_enabled(True)
    return out
