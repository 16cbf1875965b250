"""Benchmarks of functional_bridge against HF (and HookedTransformer, with --anchors).

    python -m bench [--suite NAME ...] [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                    [--size tiny|small|medium] [--anchors] [--out DIR] [--repeats N] [--quick]

timing.py: interleaved rounds, medians and spreads; models.py: sizes, shapes, the models;
anchors.py: HookedTransformer from the same weights; targets.py: the targets and where they
apply; runner.py: settings, recording, error isolation; report.py: JSON, markdown, chart;
memprobe.py: peak memory in a fresh interpreter; suites/: one file per suite.

OpenMP: unless OMP_WAIT_POLICY is already set, importing bench before torch sets it to
PASSIVE. On a CPU shared with other work, OpenMP threads spinning at barriers made 2-thread
forwards 5x (GPT-2 small) to 100x (a toy model) slower than 1 thread; passive waiting removes
that, and every contender runs under the same policy. Set OMP_WAIT_POLICY=ACTIVE to measure
the default. results.json records the policy in effect.
"""

import os as _os
import sys as _sys

OMP_POLICY_SOURCE = "environment"
if "OMP_WAIT_POLICY" not in _os.environ:
    if "torch" in _sys.modules:
        OMP_POLICY_SOURCE = "unset (torch was imported before bench: OpenMP's default)"
    else:
        _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        OMP_POLICY_SOURCE = "set by bench (was unset)"
