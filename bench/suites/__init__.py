"""The suites, in the order they run. Each module has DESCRIPTION, TARGETS and run(ctx)."""

from importlib import import_module

NAMES = ["forward", "cache", "generate", "grads", "ensemble", "patching", "sae", "optimizer", "overheads", "memory", "distributed", "compile", "parity"]


def load(name: str):
    if name not in NAMES:
        raise ValueError(f"unknown suite {name!r}; suites: {', '.join(NAMES)}")
    return import_module(f"{__name__}.{name}")
