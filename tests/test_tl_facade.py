"""The TransformerLens facade of a Bridge, each behaviour against its pure equivalent or a
closed form (the HookedTransformer comparisons are in parity/test_tl_oracle_facade.py): the
cfg, registered hooks vs per-call hooks, backward hooks vs autograd, optional hook points,
the padded loss vs a Python loop, views, enable_compatibility_mode, the tokenizer plumbing."""

import copy
import logging
import pickle
import tempfile

import pytest
import torch

import functional_bridge as fb
from family_helpers import make_family
from helpers import make_gpt2, max_diff, random_tokens
from tokenizers_local import gpt2_tokenizer, llama_tokenizer, save_pretrained
from tolerance import assert_rounding_close, check, check_above, forward_depth, max_abs, rounding_bound

TEXTS = ["When Mary and John went to the store, John gave a drink to", "Hello world!", "The cat"]


def depth(bridge, tokens) -> int:
    """Roundings along the forward's longest chain for these tokens (tests/tolerance.py)."""
    return forward_depth(bridge.cfg, tokens.shape[-1])


def assert_changed(edited, plain, n: int, what: str = "") -> None:
    """An edit shows: more than n roundings at plain's magnitude could move it."""
    check_above(max_diff(edited, plain), rounding_bound(max_abs(plain), plain.dtype, n), what)


@pytest.fixture
def bridge():
    tokenizer = gpt2_tokenizer()
    return fb.Bridge.from_hf(make_gpt2(vocab_size=len(tokenizer), n_positions=64), tokenizer=tokenizer)


# cfg -------------------------------------------------------------------------------------------


def test_cfg_is_the_static_config_and_reads_device_and_dtype_off_the_leaves(bridge):
    cfg = bridge.cfg
    tokens = random_tokens(2, 6, cfg.d_vocab)
    assert isinstance(cfg, fb.BridgeConfig) and cfg is bridge.cfg
    assert torch.equal(fb.forward(bridge.params, tokens, cfg), bridge(tokens))
    assert (cfg.device, cfg.dtype) == (torch.device("cpu"), torch.float32)
    bridge.to(torch.float64)
    assert cfg.dtype == torch.float64 and bridge(tokens).dtype == torch.float64  # never stale
    assert cfg == bridge.processed().cfg and hash(cfg) == hash(bridge.processed().cfg)
    assert type(cfg.plain()) is fb.BridgeConfig and cfg.plain().to_dict() == cfg.to_dict()
    assert type(pickle.loads(pickle.dumps(cfg))) is fb.BridgeConfig and type(copy.deepcopy(cfg)) is fb.BridgeConfig
    assert (cfg.n_layers, cfg.d_vocab, cfg.n_devices, cfg.attn_only, cfg.use_attn_scale) == (3, 320, 1, False, True)


def test_params_are_read_live_from_the_module_tree(bridge):
    """bridge.params remembers where the leaves sit, not the leaves: replacing them
    (load_state_dict(assign=True), functional_call, processing's new leaves) is seen."""
    tokens = random_tokens(1, 5, bridge.cfg.d_vocab)
    new = {name: value.detach() * 0.5 for name, value in bridge.params.items()}
    swapped = torch.func.functional_call(bridge, new, (tokens,))
    assert max_diff(swapped, fb.forward(new, tokens, bridge.cfg)) == 0
    bridge.load_state_dict(new, assign=True)
    assert all(bridge.params[name] is bridge.get_parameter(name) for name in new)
    assert all(torch.equal(bridge.params[name], value) for name, value in new.items())
    bridge.enable_compatibility_mode()  # adds leaves (unembed.b_U, lm_head.weight)
    assert list(bridge.params) == [name for name, _ in bridge.named_parameters()]


def test_cfg_architecture_is_frozen_and_tl_settings_route_to_the_facade(bridge):
    with pytest.raises(Exception, match="cfg.n_layers cannot be set"):
        bridge.cfg.n_layers = 4
    with pytest.raises(Exception, match=r"bridge.to\(...\)"):
        bridge.cfg.device = "cuda"
    bridge.cfg.use_attn_result = True  # as model.cfg.use_attn_result = True in TL notebooks
    assert bridge.cfg.use_attn_result and "blocks.0.attn.hook_result" in bridge.run_with_cache(TEXTS[0])[1]
    bridge.cfg.default_prepend_bos = False
    assert bridge.to_tokens("The cat")[0, 0] != bridge.tokenizer.bos_token_id


def test_a_cfg_outliving_its_bridge_says_so():
    cfg = fb.Bridge.from_hf(make_gpt2()).cfg
    import gc

    gc.collect()
    with pytest.raises(ReferenceError, match="no longer exists"):
        cfg.device
    assert cfg.n_layers == 3  # the architecture fields stay readable


@pytest.mark.slow
def test_bridge_cfg_is_a_compile_constant(bridge):
    torch._dynamo.reset()
    tokens = random_tokens(2, 6, bridge.cfg.d_vocab)
    params = {k: v.detach() for k, v in bridge.params.items()}
    compiled = torch.compile(fb.forward, fullgraph=True)
    n = depth(bridge, tokens)  # compiled kernels may sum in another order
    assert_rounding_close(compiled(params, tokens, bridge.cfg), fb.forward(params, tokens, bridge.cfg), n=n)
    with torch.no_grad():
        assert_rounding_close(torch.compile(bridge, fullgraph=True)(tokens), bridge(tokens), n=n)


# registered hooks are the pure layer's hooks ------------------------------------------------------


def scale_by_layer(x, hook):
    return x * (1 + 0.5 * hook.layer())


def test_registered_hooks_equal_per_call_hooks_of_the_pure_layer(bridge):
    tokens = random_tokens(2, 9, bridge.cfg.d_vocab)
    pred = lambda name: name.endswith("hook_z")  # noqa: E731
    with torch.no_grad():
        pure = fb.run_with_hooks(bridge.params, tokens, bridge.cfg, fwd_hooks=[(pred, scale_by_layer)])
        assert_changed(pure, bridge(tokens), depth(bridge, tokens))
        assert torch.equal(bridge.run_with_hooks(tokens, fwd_hooks=[(pred, scale_by_layer)]), pure)
        bridge.add_perma_hook(pred, scale_by_layer)
        assert torch.equal(bridge(tokens), pure)
        assert torch.equal(fb.forward(bridge.params, tokens, bridge.cfg), fb.forward(bridge.params, tokens, bridge.cfg, hooks=None))
        bridge.reset_hooks()
        assert torch.equal(bridge(tokens), pure)  # permanent hooks survive reset_hooks()
        bridge.reset_hooks(including_permanent=True)
        assert torch.equal(bridge(tokens), fb.forward(bridge.params, tokens, bridge.cfg))
    assert not bridge.list_hooks()


def test_hooks_context_is_clean_after_an_exception_and_nests(bridge):
    def boom(x, hook):
        raise RuntimeError("boom")

    with bridge.hooks(fwd_hooks=[("hook_embed", lambda x, hook: None)]):
        with pytest.raises(RuntimeError, match="boom"):
            with bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", boom)], bwd_hooks=[("hook_embed", boom)]):
                assert set(bridge.list_hooks()) == {"hook_embed", "blocks.0.hook_resid_pre"}
                bridge(random_tokens(1, 4, 9))
        assert list(bridge.list_hooks()) == ["hook_embed"] and bridge.context_level == 1
    assert bridge.list_hooks() == {} and bridge.context_level == 0
    with bridge.hooks(fwd_hooks=[("hook_embed", boom)], reset_hooks_end=False):
        pass
    assert list(bridge.list_hooks()) == ["hook_embed"]
    bridge.reset_hooks()


def test_hook_points_accept_add_hook_and_remove(bridge):
    tokens = random_tokens(1, 5, bridge.cfg.d_vocab)
    seen = []
    point = bridge.blocks[1].attn.hook_pattern
    assert point is bridge.hook_dict["blocks.1.attn.hook_pattern"] is bridge.mod_dict["blocks.1.attn.hook_pattern"]
    point.add_hook(lambda x, hook: seen.append((hook.name, hook.layer(), tuple(x.shape))))
    bridge(tokens)
    assert seen == [("blocks.1.attn.hook_pattern", 1, (1, 4, 5, 5))]
    point.fwd_hooks[0].hook.remove()
    bridge(tokens)
    assert len(seen) == 1 and not point.has_hooks()
    with pytest.raises(KeyError, match="closest names: blocks.0.attn.hook_pattern"):
        bridge.add_hook("blocks.0.attn.hook_patern", lambda x, h: None)


# backward hooks ----------------------------------------------------------------------------------


def test_backward_hooks_get_the_activation_gradient_and_replace_it(bridge):
    """Oracle: torch.autograd.grad of the same loss with respect to the cached activation."""
    tokens = random_tokens(2, 7, bridge.cfg.d_vocab)
    name = "blocks.1.hook_resid_mid"
    logits, cache = fb.run_with_cache(bridge.params, tokens, bridge.cfg, names_filter=name)
    (expected,) = torch.autograd.grad(fb.utils.lm_cross_entropy_loss(logits, tokens), cache[name])
    got = {}
    with bridge.hooks(bwd_hooks=[(name, lambda grad, hook: got.setdefault(hook.name, grad))]):
        bridge(tokens, return_type="loss").backward()
    assert_rounding_close(got[name], expected, n=2 * depth(bridge, tokens))  # forward and backward
    bridge.zero_grad()
    # replacing the gradient entering block 1 with zeros: block 0 learns nothing, the rest does
    with bridge.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", lambda grad, hook: torch.zeros_like(grad))]):
        bridge(tokens, return_type="loss").backward()
    grads = {n: p.grad for n, p in bridge.named_parameters()}
    assert all(grads[n].abs().max() == 0 for n in grads if n.startswith(("transformer.h.0.", "transformer.wpe")))
    assert grads["transformer.h.2.mlp.c_fc.weight"].abs().max() > 0


def test_a_backward_hook_removed_before_backward_is_not_called(bridge):
    calls = []
    with bridge.hooks(bwd_hooks=[("hook_embed", lambda grad, hook: calls.append(1))]):
        loss = bridge(random_tokens(1, 5, bridge.cfg.d_vocab), return_type="loss")
    loss.backward()  # after the context: TransformerLens's hook is gone too
    assert calls == []
    pure = fb.forward(bridge.params, random_tokens(1, 5, bridge.cfg.d_vocab), bridge.cfg, bwd_hooks=[("hook_embed", lambda g, h: calls.append(2))])
    pure.sum().backward()
    assert calls == [2]  # the pure layer's backward hooks belong to their call's graph


def test_backward_hook_returning_the_wrong_shape_is_named(bridge):
    with bridge.hooks(bwd_hooks=[("hook_embed", lambda grad, hook: grad[0])]):
        loss = bridge(random_tokens(2, 5, bridge.cfg.d_vocab), return_type="loss")
        with pytest.raises(ValueError, match="backward hook on 'hook_embed' returned"):
            loss.backward()


# optional hook points ----------------------------------------------------------------------------


def test_optional_hook_points_follow_their_definitions(bridge):
    """Closed forms: hook_result sums over heads to hook_attn_out - b_O; hook_mlp_in is
    resid_mid; hook_q_input is resid_pre once per head, and editing head h's copy changes
    head h's queries only."""
    tokens = random_tokens(2, 6, bridge.cfg.d_vocab)
    names = ["blocks.1.attn.hook_result", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_in", "blocks.1.hook_resid_mid",
             "blocks.1.hook_q_input", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_q"]  # fmt: skip
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, names_filter=names)
        assert_rounding_close(logits, bridge(tokens), n=depth(bridge, tokens))  # hooking them changes nothing
        b_O = bridge.blocks[1].attn.b_O
        # one d_model-long sum, reordered (per head, then over heads): rounding at its terms' size
        terms = max_abs(cache[names[0]].abs().sum(-2)) + max_abs(b_O)
        assert_rounding_close(cache[names[0]].sum(-2) + b_O, cache[names[1]], n=bridge.cfg.d_model, scale=terms)
        assert torch.equal(cache[names[2]], cache[names[3]])
        assert torch.equal(cache[names[4]], cache[names[5]][:, :, None].expand(-1, -1, 4, -1))

        def bump_head_2(x, hook):
            x = x.clone()
            x[:, :, 2] += torch.linspace(-1, 1, x.shape[-1])  # not constant: LayerNorm would remove it
            return x

        _, edited = bridge.run_with_cache(tokens, names_filter="blocks.1.attn.hook_q", fwd_hooks=[("blocks.1.hook_q_input", bump_head_2)])
    changed = (edited["blocks.1.attn.hook_q"] - cache["blocks.1.attn.hook_q"]).abs().amax(dim=(0, 1, 3))
    check_above(changed[2].item(), rounding_bound(max_abs(cache["blocks.1.attn.hook_q"]), torch.float32, depth(bridge, tokens)))
    assert changed[[0, 1, 3]].max() == 0


def test_optional_hook_points_are_selected_by_predicates_only_behind_their_flag(bridge):
    tokens = random_tokens(1, 4, bridge.cfg.d_vocab)
    _, plain = bridge.run_with_cache(tokens)
    assert list(plain) == fb.hook_names(bridge.cfg)  # nothing optional, nothing extra computed
    bridge.set_use_split_qkv_input(True)
    bridge.set_use_hook_mlp_in(True)
    _, cache = bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith(("_input", "mlp_in")))
    assert list(cache) == [f"blocks.{i}.{s}" for i in range(3) for s in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")]
    assert list(cache) == [n for n in fb.hook_names(bridge.cfg, ["use_split_qkv_input", "use_hook_mlp_in"]) if n in cache]
    with pytest.raises(ValueError, match="unknown optional hook flags"):
        fb.hook_names(bridge.cfg, ["use_everything"])


def test_attn_in_is_refused_under_grouped_query_attention():
    bridge = fb.Bridge.from_hf(make_family("llama"))  # 6 query heads, 2 key/value heads
    with pytest.raises(KeyError, match="grouped-query"):
        bridge.run_with_cache(random_tokens(1, 4, 97), names_filter="blocks.0.hook_attn_in")
    with pytest.raises(ValueError, match="grouped-query"):
        bridge.set_use_attn_in(True)


# forward's TL arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_text_loss_ignores_padding_like_a_loop_over_rows(bridge, side):
    """The loss of a padded string batch equals the mean, over every real next-token pair of
    every row, of -log p computed for each row alone (TL#1607: padding must not count)."""
    with torch.no_grad():
        loss = bridge(TEXTS, return_type="loss", padding_side=side)
        per_token = bridge(TEXTS, return_type="loss", loss_per_token=True, padding_side=side)
        total, pairs = 0.0, 0
        for text in TEXTS:
            row = bridge.to_tokens(text)  # [1, its own length]: no padding
            log_probs = bridge(row).double().log_softmax(-1)[0, :-1]
            total -= log_probs.gather(-1, row[0, 1:, None]).sum().item()
            pairs += row.shape[1] - 1
        scale = max_abs(bridge(TEXTS, padding_side=side))  # log_softmax's error: the logits' rounding
    n = depth(bridge, bridge.to_tokens(TEXTS)) + bridge.cfg.d_vocab + pairs  # forward, log_softmax, mean
    check(abs(loss.item() - total / pairs), rounding_bound(scale, torch.float32, n), "padded loss vs rows alone")
    mask = bridge._tokenize(TEXTS, None, side)[1]
    real_pairs = mask[:, 1:].bool() & mask[:, :-1].bool()
    assert torch.equal(per_token[~real_pairs], torch.zeros_like(per_token[~real_pairs])) and int(real_pairs.sum()) == pairs


def test_lm_cross_entropy_loss_is_mean_next_token_cross_entropy():
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (2, 5))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1))
    assert_rounding_close(fb.utils.lm_cross_entropy_loss(logits, tokens), expected, n=11 + 8, scale=max_abs(logits))


def test_stop_and_start_at_layer_compose_to_the_whole_forward(bridge):
    tokens = random_tokens(2, 8, bridge.cfg.d_vocab)
    with torch.no_grad():
        for layer in (0, 1, -1, 3):
            resid = bridge(tokens, stop_at_layer=layer)
            assert resid.shape == (2, 8, bridge.cfg.d_model)
            assert_rounding_close(bridge(resid, start_at_layer=layer), bridge(tokens), n=depth(bridge, tokens))
        _, cache = bridge.run_with_cache(tokens, stop_at_layer=1)
        assert list(cache)[-1] == "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match="needs the input tokens"):
        bridge(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="return_type must be one of"):
        bridge(tokens, return_type="logit")


# text --------------------------------------------------------------------------------------------


def test_from_pretrained_loads_the_tokenizer_saved_beside_the_model():
    tokenizer = llama_tokenizer()
    path = save_pretrained(make_family("llama", vocab_size=len(tokenizer)), tokenizer)
    bridge = fb.Bridge.from_pretrained(path)
    tokens = bridge.to_tokens(TEXTS, padding_side="left")
    assert bridge.cfg.tokenizer_prepends_bos and (tokens[:, -1] != bridge.tokenizer.pad_token_id).all()
    assert bridge.to_str_tokens(tokens[0])[0] == "<s>" and bridge.to_string(tokens[0, 1:]) == TEXTS[0]
    assert bridge.to_string(bridge.to_tokens(TEXTS[0], prepend_bos=False)[0]) == TEXTS[0]
    model_only = tempfile.mkdtemp()
    make_family("llama").save_pretrained(model_only)
    without = fb.Bridge.from_pretrained(model_only)
    assert without.tokenizer is None
    with pytest.raises(ValueError, match="needs a tokenizer"):
        without.to_tokens("hello")


def test_text_batches_equal_their_rows_alone(bridge):
    """A padded batch of texts (either side) gives each row's logits at its real tokens."""
    with torch.no_grad():
        for side in ("left", "right"):
            logits = bridge(TEXTS, padding_side=side)
            mask = bridge._tokenize(TEXTS, None, side)[1].bool()
            for row, text in enumerate(TEXTS):
                alone = bridge(text)[0]
                assert_rounding_close(logits[row][mask[row]], alone, n=depth(bridge, mask))


def test_to_tokens_truncates_to_the_context_and_single_tokens_are_checked(bridge):
    long_text = " ".join(["the cat sat"] * 40)
    assert bridge.to_tokens(long_text).shape[1] == bridge.cfg.n_ctx
    assert bridge.to_tokens(long_text, truncate=False).shape[1] > bridge.cfg.n_ctx
    with pytest.raises(ValueError, match="is not a single token"):
        bridge.to_single_token(" Mary and John")
    with pytest.raises(ValueError, match="does not occur"):
        bridge.get_token_position(" dog", "The cat")


# views -------------------------------------------------------------------------------------------


def test_block_views_are_derived_registered_once_and_never_stale(bridge):
    n_params = len(list(bridge.parameters()))
    W_Q = bridge.blocks[1].attn.W_Q.detach().clone()
    assert torch.equal(W_Q, bridge.tl_parameters()["blocks.1.attn.W_Q"]) and torch.equal(bridge.blocks[-1].ln2.w, bridge.tl_parameters()["blocks.2.ln2.w"])
    assert len(bridge.blocks) == 3 and len(list(bridge.parameters())) == n_params
    assert not any(name.startswith("blocks") for name, _ in bridge.named_modules())
    optimizer = torch.optim.SGD(bridge.parameters(), lr=0.1)
    bridge(random_tokens(1, 5, bridge.cfg.d_vocab), return_type="loss").backward()
    optimizer.step()
    assert not torch.equal(bridge.blocks[1].attn.W_Q, W_Q)
    with pytest.raises(AttributeError, match="set_tl_weights"):
        bridge.blocks[1].attn.W_Q = W_Q
    with pytest.raises(AttributeError, match="has no attribute 'W_X'"):
        bridge.blocks[1].attn.W_X


# moving and processing ---------------------------------------------------------------------------


def test_to_prints_details_when_asked(bridge, capsys):
    bridge.to(torch.float64, print_details=True)
    assert "float64" in capsys.readouterr().out and bridge.cfg.dtype == torch.float64
    bridge.to("cpu")
    assert capsys.readouterr().out == ""


def test_enable_compatibility_mode_processes_the_leaves_in_place(bridge):
    """Equal to bridge.processed() (itself equal to HookedTransformer's processing), on the
    same Parameter objects, which an optimizer built before keeps stepping."""
    tokens = random_tokens(2, 6, bridge.cfg.d_vocab)
    reference = bridge.processed()
    leaves = dict(bridge.named_parameters())
    optimizer = torch.optim.SGD(bridge.parameters(), lr=0.1)
    bridge.enable_compatibility_mode()
    assert all(bridge.get_parameter(name) is leaf for name, leaf in leaves.items())
    assert all(p.is_leaf and p.requires_grad for p in bridge.parameters())
    assert list(bridge.params) == list(reference.params)
    for name, value in reference.params.items():
        assert torch.equal(bridge.params[name], value), name
    before = leaves["transformer.h.0.mlp.c_fc.weight"].detach().clone()
    bridge(tokens, return_type="loss").backward()
    optimizer.step()
    assert not torch.equal(leaves["transformer.h.0.mlp.c_fc.weight"], before)


def test_enable_compatibility_mode_is_atomic_and_runs_once(caplog):
    bridge = fb.Bridge.from_hf(make_family("llama"))
    before = {name: value.detach().clone() for name, value in bridge.params.items()}
    with pytest.raises(ValueError, match="refactor_factored_attn_matrices is not defined with rotary"):
        bridge.enable_compatibility_mode(refactor_factored_attn_matrices=True)
    assert all(torch.equal(bridge.params[name], value) for name, value in before.items()) and list(bridge.params) == list(before)
    bridge.enable_compatibility_mode(no_processing=True)
    assert all(torch.equal(bridge.params[name], value) for name, value in before.items())
    bridge.enable_compatibility_mode()
    processed = {name: value.detach().clone() for name, value in bridge.params.items()}
    with caplog.at_level(logging.WARNING):
        bridge.enable_compatibility_mode()
    assert "already processed" in caplog.text
    assert all(torch.equal(bridge.params[name], value) for name, value in processed.items())


def test_utils_match_their_definitions():
    assert fb.utils.get_act_name("resid_pre", 3) == "blocks.3.hook_resid_pre" == fb.utils.get_act_name("blocks.3.hook_resid_pre")
    assert fb.utils.get_act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    x = torch.arange(24.0).view(2, 3, 4)
    assert (fb.utils.to_numpy(x.to(torch.bfloat16)) == x.numpy()).all()
    assert torch.equal(fb.utils.get_corner(x, 2), x[:2, :2, :2])
    assert fb.utils.remove_batch_dim(x[:1]).shape == (3, 4)


def test_test_prompt_prints_the_answer_rank(bridge, capsys):
    fb.utils.test_prompt("When Mary and John went to the store, John gave a drink to", "Mary", bridge, top_k=3)
    out = capsys.readouterr().out
    assert "Tokenized answer: [' Mary']" in out and "Ranks of the answer tokens:" in out
