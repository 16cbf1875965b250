import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

import transformers

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="session")
def transformer_lens():
    """TransformerLens 3.9, the oracle. FB_REQUIRE_ORACLE=1 (set by .ci/run) turns a missing
    install into a failure instead of a skip."""
    try:
        import transformer_lens
    except ImportError:
        if os.environ.get("FB_REQUIRE_ORACLE") == "1":
            pytest.fail("transformer-lens is not installed but FB_REQUIRE_ORACLE=1")
        pytest.skip("transformer-lens not installed (pip install -e .[oracle])")
    return transformer_lens


@pytest.fixture(scope="session")
def sae_lens():
    """SAELens 6.54 (with its HookedSAETransformer over TransformerLens 3.9), the SAE oracle;
    FB_REQUIRE_ORACLE=1 turns a missing install into a failure, as for transformer_lens."""
    try:
        import sae_lens
    except ImportError:
        if os.environ.get("FB_REQUIRE_ORACLE") == "1":
            pytest.fail("sae-lens is not installed but FB_REQUIRE_ORACLE=1")
        pytest.skip("sae-lens not installed (pip install -e .[oracle])")
    return sae_lens


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
