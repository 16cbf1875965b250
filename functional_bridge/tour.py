"""A short tour on a GPT-2 built locally: the one-pytree promise, checked as it is shown."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .bridge import Bridge


def _tour_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=128, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def run_tour(seed: int = 0, out=print) -> dict:
    """Print the tour and return its figures."""
    hf = _tour_model(seed)
    start = time.perf_counter()
    bridge = Bridge.from_hf(hf)
    build_ms = 1e3 * (time.perf_counter() - start)
    figures: dict = {"from_hf_ms": build_ms}

    hf_leaves, ours = list(hf.parameters()), list(bridge.parameters())
    figures["parameter_objects"] = (len(ours), len(hf_leaves))
    figures["numel"] = (sum(p.numel() for p in ours), sum(p.numel() for p in hf_leaves))
    shared = all(a is b for a, b in zip(ours, hf_leaves))
    out(f"GPT-2 built locally: {bridge.cfg.n_layers} layers, d_model {bridge.cfg.d_model}")
    out(f"from_hf: {build_ms:.1f} ms, zero copy: {shared}")
    out(f"parameters: {figures['parameter_objects'][0]} objects, {figures['numel'][0]:,} numbers (HF: "
        f"{figures['parameter_objects'][1]} objects, {figures['numel'][1]:,} numbers)")

    tokens = torch.randint(0, bridge.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(tokens)
    mask[1, :9] = 0  # left padding
    mask[2, 20:] = 0  # right padding
    with torch.no_grad():
        ours_logits = bridge(tokens)
        for attn in ("eager", "sdpa"):
            hf.set_attn_implementation(attn)
            figures[f"max_abs_logit_diff_{attn}"] = (ours_logits - hf(tokens).logits).abs().max().item()
        padded = bridge(tokens, attention_mask=mask)
        alone = [hf(row[m.bool()][None]).logits[0] for row, m in zip(tokens, mask)]
        figures["max_abs_logit_diff_padded"] = max(
            (padded[i][mask[i].bool()] - alone[i]).abs().max().item() for i in range(len(alone))
        )
    out("parity with HF (max |logit difference|, float32): "
        f"eager {figures['max_abs_logit_diff_eager']:.1e}, sdpa {figures['max_abs_logit_diff_sdpa']:.1e}, "
        f"padded rows vs each row alone {figures['max_abs_logit_diff_padded']:.1e}")

    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens[:1], names_filter="blocks.1.attn.hook_pattern")
    pattern = cache["blocks.1.attn.hook_pattern"]
    out(f"cached blocks.1.attn.hook_pattern: shape {list(pattern.shape)} [batch, head, query_pos, key_pos]; "
        f"head 0, query 3: {[round(x, 3) for x in pattern[0, 0, 3, :4].tolist()]}")

    W_Q_before = bridge.W_Q.detach().clone()
    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-2)
    logits = bridge(tokens)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    W_Q_hf = hf.transformer.h[0].attn.c_attn.weight[:, : bridge.cfg.d_model]
    follows = torch.equal(bridge.W_Q[0], W_Q_hf.view(bridge.cfg.d_model, bridge.cfg.n_heads, -1).transpose(0, 1))
    figures["W_Q_moved"] = (bridge.W_Q - W_Q_before).abs().max().item()
    figures["tl_view_follows_step"] = follows
    out(f"one AdamW step (loss {loss.item():.3f}): W_Q moved by up to {figures['W_Q_moved']:.1e}; "
        f"TL view equals the HF tensors after the step: {follows}")
    return figures
