"""The torch.func workflows on BERT: per-example gradients of the masked-LM loss against a loop of
HF backward passes, vmapped patching against a loop of run_with_hooks, functional_call and
vmap over rows against the batched forward."""

import pytest
import torch
from torch.func import functional_call, vmap

import functional_bridge as fb
from bert_helpers import VOCAB, bert_batch, make_bert
from helpers import max_diff


def _mlm_batch():
    """Padded rows with token types, ids >= 1 at real tokens (HF's word embedding has
    padding_idx=0, whose row HF never gives a gradient), and 3 scored labels per row."""
    tokens, mask, types = bert_batch([11, 7, 4, 9], "right", seed=5)
    tokens = tokens.clamp(min=1)
    labels = torch.full_like(tokens, -100)
    labels[:, [0, 2, 3]] = tokens[:, [0, 2, 3]]
    tokens[:, 2] = 3  # a [MASK]-like id at a scored position
    return tokens, mask, types, labels


def _hf_row_grads(hf, tokens, mask, types, labels):
    grads = []
    for row in range(len(tokens)):
        hf.zero_grad()
        rows = slice(row, row + 1)
        hf(tokens[rows], attention_mask=mask[rows], token_type_ids=types[rows], labels=labels[rows]).loss.backward()
        grads.append({name: p.grad.clone() for name, p in hf.named_parameters()})
    return grads


def _relative_errors(grads, reference) -> dict:
    """(row, leaf) -> max error / the leaf's largest reference gradient; a key bias, whose true
    gradient is 0 (softmax ignores a shift shared by a query's keys), against the row's largest."""
    out = {}
    for row, leaves in enumerate(reference):
        row_scale = max(g.abs().max().item() for g in leaves.values())
        for name, expected in leaves.items():
            scale = row_scale if name.endswith("key.bias") else expected.abs().max().item()
            out[row, name] = max_diff(grads[row][name], expected) / scale
    return out


def test_per_example_grads_of_the_mlm_loss_equal_hf_backward_per_row():
    """Each row's gradient, as HF's backward of its own masked-LM loss (labels, padding, token
    types). Bound: each leaf's relative error against HF in float64 is at most 4x the worst
    relative error of HF's own float32 backward."""
    hf = make_bert()
    tokens, mask, types, labels = _mlm_batch()
    ours = fb.per_example_grads(
        fb.Bridge.from_hf(hf).params, fb.Bridge.from_hf(hf).cfg, tokens, mask,
        loss_fn=fb.masked_lm_loss, labels=labels, token_type_ids=types,
    )  # fmt: skip
    hf32 = _hf_row_grads(hf, tokens, mask, types, labels)
    hf64 = _hf_row_grads(hf.double(), tokens, mask, types, labels)
    yardstick = max(_relative_errors(hf32, hf64).values())
    assert yardstick > 0
    ours_by_row = [{name: ours[name][row] for name in ours} for row in range(len(tokens))]
    for key, error in _relative_errors(ours_by_row, hf64).items():
        assert error <= 4 * yardstick, (key, error, yardstick)


@pytest.fixture(scope="module")
def patching_setup():
    hf = make_bert()
    bridge = fb.Bridge.from_hf(hf)
    params = {k: v.detach() for k, v in bridge.params.items()}
    clean, _, _ = bert_batch([8, 8], "right", seed=1)
    corrupted = clean.clone()
    corrupted[:, [2, 5]] = (clean[:, [2, 5]] + 7) % VOCAB
    metric = lambda logits: logits[:, 3, 11].mean() - logits[:, 3, 13].mean()  # noqa: E731
    return params, bridge.cfg, clean, corrupted, metric


def test_head_z_patching_equals_a_loop_of_run_with_hooks(patching_setup):
    params, cfg, clean, corrupted, metric = patching_setup
    with torch.no_grad():
        swept = fb.patching.head_z_patching(params, cfg, clean, corrupted, metric)
        _, source = fb.run_with_cache(params, corrupted, cfg, names_filter=lambda n: n.endswith("hook_z"))
        expected = torch.zeros(cfg.n_layers, cfg.n_heads)
        for layer in range(cfg.n_layers):
            for head in range(cfg.n_heads):

                def patch(z, hook, head=head):
                    z = z.clone()
                    z[:, :, head] = source[hook.name][:, :, head]
                    return z

                logits = fb.run_with_hooks(params, clean, cfg, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
                expected[layer, head] = metric(logits)
        scale = fb.forward(params, clean, cfg).abs().max().item()
    assert expected.std() > 1e-2 * scale  # the patches move the metric differently
    assert max_diff(swept, expected) <= 1e-4 * scale


def test_functional_call_and_vmap_over_rows_equal_the_batched_forward():
    """functional_call takes token types as a keyword; vmap over rows (the explicit attention
    path, bidirectional mask built per row) equals the batched SDPA forward."""
    hf = make_bert()
    bridge = fb.Bridge.from_hf(hf)
    params = {k: v.detach() for k, v in bridge.params.items()}
    tokens, mask, types = bert_batch([10, 6, 3], "right")
    with torch.no_grad():
        batched = fb.forward(params, tokens, bridge.cfg, attention_mask=mask, token_type_ids=types)
        called = functional_call(bridge, params, (tokens,), {"attention_mask": mask, "token_type_ids": types})
        assert torch.equal(called, batched)

        def one(row, row_mask, row_types):
            return fb.forward(params, row, bridge.cfg, attention_mask=row_mask, token_type_ids=row_types)[0]

        rows = vmap(one)(tokens, mask, types)
    assert max_diff(rows, batched) <= 1e-4 * batched.abs().max()


@pytest.mark.slow
def test_compiled_forward_and_cache_equal_eager():
    """fullgraph torch.compile through the encoder dispatch, token types and the padding mask."""
    torch._dynamo.reset()
    bridge = fb.Bridge.from_hf(make_bert())
    params = {k: v.detach() for k, v in bridge.params.items()}
    tokens, mask, types = bert_batch([9, 5], "right")
    inputs = dict(attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        eager, eager_cache = fb.run_with_cache(params, tokens, bridge.cfg, **inputs)
        compiled = torch.compile(fb.forward, fullgraph=True)(params, tokens, bridge.cfg, **inputs)
        logits, cache = torch.compile(fb.run_with_cache, fullgraph=True)(params, tokens, bridge.cfg, **inputs)
    bound = 1e-4 * eager.abs().max()
    assert max_diff(compiled, eager) <= bound and max_diff(logits, eager) <= bound
    assert list(cache) == list(eager_cache)
