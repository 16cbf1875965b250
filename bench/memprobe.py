"""Peak memory of one call, measured in a fresh interpreter (run by the memory suite):

    python -m bench.memprobe --contender ours_cache --size small --device cpu --dtype float32 --shape 4x128

prints one JSON line per contender (--contender is repeatable: the contenders are then measured
one after another in this interpreter). The model is built and the call warmed up once; then the peak is taken
over one more call whose outputs are kept (logits, and the cache where there is one). CPU: the
kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the resident set
before the call. torch's CPU allocator is glibc malloc, so the child runs with a fixed mmap
threshold (MALLOC_ENV: every block of 16 KiB or more is mapped on allocation and unmapped on
free, and glibc's dynamic threshold, which would otherwise keep freed activations in the heap
after the warm-up, is off): the resident set then follows live tensors (tracemalloc would not
see them). If clear_refs is not writable, a 1 ms psutil sampler stands in. CUDA: torch.cuda.max_memory_allocated minus memory_allocated before.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "65536"}
CONTENDERS = ("hf_forward", "hf_eager_outputs", "ours_forward", "ours_cache", "tl_cache")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class _CpuPeak:
    """Peak resident bytes during a block, relative to the start."""

    def __enter__(self):
        gc.collect()
        self.sampler = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            import psutil

            self.method, self.process, self.peak, self.stop = "psutil 1 ms sampler", psutil.Process(), 0, False

            def sample():
                while not self.stop:
                    self.peak = max(self.peak, self.process.memory_info().rss)
                    time.sleep(0.001)

            self.sampler = threading.Thread(target=sample, daemon=True)
        self.before = _status_kib("VmRSS") * 1024
        if self.sampler:
            self.sampler.start()
        return self

    def __exit__(self, *exc):
        after = _status_kib("VmRSS") * 1024
        if self.sampler:
            self.stop = True
            self.sampler.join()
            peak = max(self.peak, after)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.peak_bytes, self.retained_bytes = peak - self.before, after - self.before
        return False


class _CudaPeak:
    method = "torch.cuda.max_memory_allocated"

    def __enter__(self):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.before
        self.retained_bytes = torch.cuda.memory_allocated() - self.before
        return False


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return sum(_tensor_bytes(v) for _, v in obj.items())
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def probe(contenders: list[str], size: str, device: str, dtype: str, shape: tuple[int, int], seed: int = 0) -> list[dict]:
    """Peak of each contender's call, one after another in this interpreter (each measured from
    the resident set just before its own call)."""
    import functional_bridge as fb

    from .models import build_hf, hf_twin, random_tokens
    from .runner import DTYPES

    hf = build_hf(size, device, DTYPES[dtype], seed)
    tokens = random_tokens(shape, hf.config.vocab_size, device)
    results = []
    for contender in contenders:
        if contender == "hf_forward":
            call = lambda: hf(tokens, use_cache=False).logits  # noqa: E731
        elif contender == "hf_eager_outputs":
            eager = hf_twin(hf, "eager")
            call = lambda: eager(tokens, use_cache=False, output_attentions=True, output_hidden_states=True)  # noqa: E731
        elif contender in ("ours_forward", "ours_cache"):
            bridge = fb.Bridge.from_hf(hf)
            call = (lambda: bridge(tokens)) if contender == "ours_forward" else (lambda: bridge.run_with_cache(tokens))
        elif contender == "tl_cache":
            from .anchors import hooked_transformer

            model = hooked_transformer(hf)  # its own copy of the weights
            call = lambda: model.run_with_cache(tokens)  # noqa: E731
        else:
            raise ValueError(f"unknown contender {contender!r}; known: {CONTENDERS}")
        meter = _CudaPeak() if torch.device(device).type == "cuda" else _CpuPeak()
        with torch.inference_mode():
            out = call()  # warm-up: lazy initialisation is not the call's memory
            del out
            with meter:
                out = call()
        results.append({
            "contender": contender, "peak_bytes": meter.peak_bytes, "retained_bytes": meter.retained_bytes,
            "output_tensor_bytes": _tensor_bytes(out), "method": meter.method,
            "malloc_env": {key: os.environ.get(key) for key in MALLOC_ENV},
        })  # fmt: skip
        del out, call
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contender", required=True, action="append", choices=CONTENDERS, help="repeatable")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", default="4x16")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    batch, pos = (int(x) for x in args.shape.split("x"))
    for result in probe(args.contender, args.size, args.device, args.dtype, (batch, pos), args.seed):
        print(json.dumps(result))


if __name__ == "__main__":
    main()
