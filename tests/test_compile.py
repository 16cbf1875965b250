"""torch.compile over the pure forward, the cache, the Bridge module and vmap(grad(...)),
each against eager on a tiny model. fullgraph=True everywhere: no graph breaks."""

import pytest
import torch
from torch.func import grad, vmap

import functional_bridge as fb
from helpers import make_gpt2, max_diff, random_tokens

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
        assert max_diff(compiled(params, tokens, bridge.cfg, attention_mask=attention_mask), eager) <= 1e-5


def test_compiled_run_with_cache_equals_eager(tiny):
    bridge, tokens, mask = tiny
    params = {k: v.detach() for k, v in bridge.params.items()}
    compiled = torch.compile(fb.run_with_cache, fullgraph=True)
    logits, cache = compiled(params, tokens, bridge.cfg, attention_mask=mask)
    eager_logits, eager_cache = fb.run_with_cache(params, tokens, bridge.cfg, attention_mask=mask)
    assert list(cache) == list(eager_cache)
    assert max_diff(logits, eager_logits) <= 1e-5
    for name, value in eager_cache.items():
        finite = value.isfinite()
        assert torch.equal(cache[name].isfinite(), finite), name
        assert max_diff(cache[name][finite], value[finite]) <= 1e-5, name


def test_compiled_bridge_module_equals_eager(tiny):
    bridge, tokens, mask = tiny
    compiled = torch.compile(bridge, fullgraph=True)
    with torch.no_grad():
        assert max_diff(compiled(tokens), bridge(tokens)) <= 1e-5
        assert max_diff(compiled(tokens, attention_mask=mask), bridge(tokens, attention_mask=mask)) <= 1e-5


def test_compiled_vmap_grad_equals_eager(tiny):
    bridge, tokens, mask = tiny
    params = {k: v.detach() for k, v in bridge.params.items()}
    cfg = bridge.cfg

    def loss(p, row, row_mask):
        return fb.next_token_loss(fb.forward(p, row, cfg, attention_mask=row_mask), row[None], row_mask[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    compiled = torch.compile(per_example, fullgraph=True)(params, tokens, mask)
    eager = per_example(params, tokens, mask)
    for name in eager:
        assert max_diff(compiled[name], eager[name]) <= 1e-5, name
