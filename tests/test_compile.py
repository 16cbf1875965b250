"""torch.compile over the pure forward, the cache, the Bridge module and vmap(grad(...)),
each against eager on a tiny model. fullgraph=True everywhere: no graph breaks."""

import pytest
import torch
from torch.func import grad, vmap

import functional_bridge as fb
from helpers import make_gpt2, random_tokens
from tolerance import assert_as_accurate_as, float64

# Each compiled result against eager, no further from eager's float64 run than 4x eager is.

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny():
    torch._dynamo.reset()
    hf = make_gpt2(n_layer=2, n_embd=32, n_head=2, n_inner=64)
    bridge = fb.Bridge.from_hf(hf)
    tokens = random_tokens(3, 8, bridge.cfg.d_vocab)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    return bridge, tokens, mask


def test_compiled_forward_equals_eager(tiny):
    bridge, tokens, mask = tiny
    params = {k: v.detach() for k, v in bridge.params.items()}
    compiled = torch.compile(fb.forward, fullgraph=True)
    for attention_mask in (None, mask):
        eager = fb.forward(params, tokens, bridge.cfg, attention_mask=attention_mask)
        eager64 = fb.forward(float64(params), tokens, bridge.cfg, attention_mask=attention_mask)
        assert_as_accurate_as(compiled(params, tokens, bridge.cfg, attention_mask=attention_mask), eager, eager64)


def test_compiled_run_with_cache_equals_eager(tiny):
    bridge, tokens, mask = tiny
    params = {k: v.detach() for k, v in bridge.params.items()}
    compiled = torch.compile(fb.run_with_cache, fullgraph=True)
    logits, cache = compiled(params, tokens, bridge.cfg, attention_mask=mask)
    eager_logits, eager_cache = fb.run_with_cache(params, tokens, bridge.cfg, attention_mask=mask)
    logits64, cache64 = fb.run_with_cache(float64(params), tokens, bridge.cfg, attention_mask=mask)
    assert list(cache) == list(eager_cache)
    assert_as_accurate_as(logits, eager_logits, logits64, what="logits")
    for name, value in eager_cache.items():
        assert torch.equal(cache[name].isfinite(), value.isfinite()), name
    assert_as_accurate_as(cache, eager_cache, cache64, per_key_scale=True)  # masked scores: -inf in each


def test_compiled_bridge_module_equals_eager(tiny):
    bridge, tokens, mask = tiny
    compiled = torch.compile(bridge, fullgraph=True)
    params64 = float64(bridge.params)
    with torch.no_grad():
        assert_as_accurate_as(compiled(tokens), bridge(tokens), fb.forward(params64, tokens, bridge.cfg))
        ref64 = fb.forward(params64, tokens, bridge.cfg, attention_mask=mask)
        assert_as_accurate_as(compiled(tokens, attention_mask=mask), bridge(tokens, attention_mask=mask), ref64)


def test_compiled_vmap_grad_equals_eager(tiny):
    bridge, tokens, mask = tiny
    params = {k: v.detach() for k, v in bridge.params.items()}
    cfg = bridge.cfg

    def loss(p, row, row_mask):
        return fb.next_token_loss(fb.forward(p, row, cfg, attention_mask=row_mask), row[None], row_mask[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    compiled = torch.compile(per_example, fullgraph=True)(params, tokens, mask)
    eager, eager64 = per_example(params, tokens, mask), per_example(float64(params), tokens, mask)
    assert_as_accurate_as(compiled, eager, eager64)
