import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# OpenMP threads that spin while waiting steal the CPU from each other and from anything else on a
# shared machine: 20 GPT-2 training steps at 2 threads beside other work took 106-198 s spinning,
# 6-18 s sleeping (PASSIVE). Set before torch loads its OpenMP runtime; a caller's choice wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist each worker is a process with its own OpenMP pool: N workers at the default
# thread count (one per core) put N threads on every core. Unless the caller set OMP_NUM_THREADS,
# each worker takes an equal share of the cores (the README's `-n 2` on 2 cores: one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_WORKER_THREADS = None  # set here only: a caller's OMP_NUM_THREADS is torch's to read, in any syntax
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _WORKER_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_WORKER_THREADS)

import pytest
import torch

import transformers

transformers.logging.set_verbosity_error()
if _WORKER_THREADS is not None:
    torch.set_num_threads(_WORKER_THREADS)  # in case a plugin imported torch before this file ran


def _oracle(module: str, package: str):
    """Import an oracle package; FB_REQUIRE_ORACLE=1 (set by .ci/run) turns a missing install
    into a failure instead of a skip."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("FB_REQUIRE_ORACLE") == "1":
            pytest.fail(f"{package} is not installed but FB_REQUIRE_ORACLE=1")
        pytest.skip(f"{package} not installed (pip install -e .[oracle])")


@pytest.fixture(scope="session")
def transformer_lens():
    """TransformerLens 3.9, the oracle."""
    return _oracle("transformer_lens", "transformer-lens")


@pytest.fixture(scope="session")
def sae_lens():
    """SAELens 6.54 (its HookedSAETransformer runs over TransformerLens 3.9), the SAE oracle."""
    return _oracle("sae_lens", "sae-lens")


# FB_CUDA_TESTS_DEVICE=cpu runs the cuda-marked tests on the CPU: a dry run of their code on a
# machine without a GPU (they assert the same things; only the device differs).
CUDA_TESTS_DEVICE = os.environ.get("FB_CUDA_TESTS_DEVICE", "cuda")


@pytest.fixture
def device():
    """The device cuda-marked tests run on."""
    return torch.device(CUDA_TESTS_DEVICE)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or CUDA_TESTS_DEVICE != "cuda":
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
