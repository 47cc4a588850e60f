import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def emulated():
    """torch.ops.lmm_fast_emulated: the CUDA ops' kernels and host code on
    the emulated device (built on first use; a build failure fails the tests
    that need it, it never skips them)."""
    import emulated_backend

    return emulated_backend.load()
