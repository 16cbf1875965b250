"""Overheads: Bridge.from_hf (adopting an HF model's tensors), tl_parameters() (deriving
TransformerLens's weights from the leaves), the TransformerLens facade's stateful-hook path
against the pure layer (the same forward with the same hook: bridge(tokens) vs fb.forward,
bridge.run_with_hooks vs fb.run_with_hooks, a registered permanent hook vs per-call hooks),
and the import time of functional_bridge in a fresh interpreter (wall time, against `import torch, transformers` alone, and
`python -X importtime`'s cumulative figure). With --anchors, HookedTransformer's build from the
same HF weights (config, TransformerLens's conversion, load_and_process_state_dict)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import functional_bridge as fb

from .. import targets
from ..timing import Stats

DESCRIPTION = __doc__
TARGETS = [
    f"Bridge.from_hf ms {targets.FROM_HF_MS.text()}",
    f"facade hooks: stateful path / pure layer {targets.FACADE_HOOKS.text()}",
    f"facade hooks: max |stateful - pure| {targets.AGREE_TEXT}",
]


def run(ctx) -> None:
    hf = ctx.models.hf(ctx.dtype)
    bridge = ctx.models.bridge(ctx.dtype)
    case = ctx.settings.size
    m = ctx.measure(case, {"from_hf": lambda: fb.Bridge.from_hf(hf), "tl_parameters": bridge.tl_parameters})
    row = ctx.time_row(case, m, "from_hf", "Bridge.from_hf")
    ctx.judge(row, targets.FROM_HF_MS, None)
    ctx.time_row(case, m, "tl_parameters", "tl_parameters()")
    if ctx.settings.anchors:
        ctx.attempt("HookedTransformer build", lambda: _anchor_build(ctx, hf, m))
    _facade_hooks(ctx, hf, bridge)
    _import_times(ctx)


def _facade_hooks(ctx, hf, bridge) -> None:
    """The stateful path (hooks kept on the facade, handed to the pure forward per call) against
    the pure forward with the same hook, interleaved in one process, under inference_mode."""
    import torch

    from ..models import random_tokens
    from ..runner import case_name

    shape = ctx.plan.shapes[-1]
    case = f"facade hooks {case_name(shape)}"
    tokens = random_tokens(shape, bridge.cfg.d_vocab, ctx.device)
    params, cfg = bridge.params, bridge.cfg
    name = f"blocks.{cfg.n_layers // 2}.attn.hook_z"

    def ablate_head_0(z, hook):  # z: [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, 0] = 0
        return z

    hooks = [(name, ablate_head_0)]
    permanent = fb.Bridge.from_hf(hf)  # the same leaves, with the hook registered for good
    permanent.add_perma_hook(name, ablate_head_0)
    contenders = {
        "pure_forward": lambda: fb.forward(params, tokens, cfg),
        "facade_forward": lambda: bridge(tokens),
        "pure_hooked": lambda: fb.run_with_hooks(params, tokens, cfg, fwd_hooks=hooks),
        "facade_run_with_hooks": lambda: bridge.run_with_hooks(tokens, fwd_hooks=hooks),
        "facade_perma_hook": lambda: permanent(tokens),
    }
    agree = targets.agreement(ctx.dtype)
    with torch.inference_mode():
        out = {key: fn() for key, fn in contenders.items()}  # agreement first (also a warm-up)
        for key, reference in (("facade_forward", "pure_forward"), ("facade_run_with_hooks", "pure_hooked"),
                               ("facade_perma_hook", "pure_hooked")):  # fmt: skip
            diff = (out[key].float() - out[reference].float()).abs().max().item()
            ctx.value_row(case, f"max |{key} - {reference}|", diff, "abs", agree, shape)
        m = ctx.measure(case, contenders)
    ctx.note(f"facade hooks: one editing hook on {name} (head 0 of z set to zero), {case_name(shape)} tokens.")
    target = targets.FACADE_HOOKS
    ctx.ratio_row(case, m, "facade_forward", "pure_forward", "bridge(tokens) / fb.forward (no hooks)", target, shape)
    ctx.ratio_row(case, m, "facade_run_with_hooks", "pure_hooked", "bridge.run_with_hooks / fb.run_with_hooks", target, shape)
    ctx.ratio_row(case, m, "facade_perma_hook", "pure_hooked", "registered permanent hook / fb.run_with_hooks", target, shape)


def _anchor_build(ctx, hf, m) -> None:
    from ..anchors import hooked_transformer

    seconds = []
    for _ in range(max(1, min(3, ctx.settings.repeats))):
        _, model = _timed(lambda: hooked_transformer(hf), seconds)
        del model
    st = Stats.of(seconds).scaled(1e3)
    ctx.value_row(ctx.settings.size, "HookedTransformer build (from the HF weights) time", st.median, "ms", stats=st,
                  note="init_weights=False, weights from TransformerLens's convert_gpt2_weights")  # fmt: skip
    ratio = st.median / (m.stats("from_hf").median * 1e3)
    ctx.value_row(ctx.settings.size, "HookedTransformer build / Bridge.from_hf (medians)", ratio, "x")


def _timed(fn, seconds: list[float]):
    begin = time.perf_counter()
    result = fn()
    seconds.append(time.perf_counter() - begin)
    return seconds[-1], result


def _python(code: str, *flags: str) -> tuple[float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - begin
    if done.returncode:
        raise RuntimeError(f"python {' '.join(flags)} -c {code!r} failed: {done.stderr[-2000:]}")
    return seconds, done.stderr


def _import_times(ctx) -> None:
    case = "fresh interpreter"
    seconds, log = _python("import functional_bridge", "-X", "importtime")  # also warms the file cache
    if ctx.settings.quick:
        ctx.value_row(case, "wall: python -X importtime -c 'import functional_bridge'", seconds * 1e3, "ms",
                      note="--quick: one run, no baselines")  # fmt: skip
    else:
        repeats = max(1, min(5, ctx.settings.repeats))
        contenders = {"functional_bridge": "import functional_bridge", "torch+transformers": "import torch, transformers",
                      "python": "pass"}  # fmt: skip
        samples = {name: [] for name in contenders}
        for _ in range(repeats):  # interleaved
            for name, code in contenders.items():
                samples[name].append(_python(code)[0])
        ctx.current.samples[case] = samples
        for name, code in contenders.items():
            st = Stats.of(samples[name]).scaled(1e3)
            ctx.value_row(case, f"wall: python -c {code!r}", st.median, "ms", stats=st)
        pairs = zip(samples["functional_bridge"], samples["torch+transformers"])
        extra = Stats.of([a - b for a, b in pairs]).scaled(1e3)
        ctx.value_row(case, "wall: functional_bridge - (torch + transformers)", extra.median, "ms", stats=extra)
    cumulative = None
    for line in log.splitlines():  # "import time: self [us] | cumulative | imported package"
        match = re.match(r"import time:\s*(\d+) \|\s*(\d+) \|\s*(.*)$", line)
        if match and match.group(3).strip() == "functional_bridge":
            cumulative = int(match.group(2))
    if cumulative is not None:
        ctx.value_row(case, "-X importtime: functional_bridge cumulative", cumulative / 1e3, "ms",
                      note="includes torch and transformers, which it imports")  # fmt: skip
        lines = (re.match(r"import time:\s*(\d+) \|\s*\d+ \|\s*functional_bridge\b", line) for line in log.splitlines())
        package = sum(int(match.group(1)) for match in lines if match)
        ctx.value_row(case, "-X importtime: functional_bridge's own modules (self times)", package / 1e3, "ms")
