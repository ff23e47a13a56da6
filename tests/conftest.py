"""Every shared case runs once per backend under test.

``FASTVAE_TEST_BACKENDS`` (comma-separated) picks the backends; by default every backend that
``fastvae.available_backends`` lists for the test device (``FASTVAE_TEST_DEVICE``, default
cpu; 'triton' runs on CPU only under ``TRITON_INTERPRET=1``). Tensors a test creates inside
the ``backend`` fixture land on that device.
"""
import os

import pytest
import torch

import fastvae
from cases import ON_CUDA, TEST_DEVICE

cuda_only = pytest.mark.skipif(not ON_CUDA, reason="a CUDA-only behaviour: run the suite with "
                               "FASTVAE_TEST_DEVICE=cuda on a GPU")
cpu_only = pytest.mark.skipif(ON_CUDA, reason="about CPU tensors only; its CUDA counterpart "
                              "runs in the CUDA tests")


def backends_under_test():
    chosen = os.environ.get("FASTVAE_TEST_BACKENDS")
    if chosen:
        return [name.strip() for name in chosen.split(",") if name.strip()]
    return fastvae.available_backends(TEST_DEVICE)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton: needs the Triton backend (run under TRITON_INTERPRET=1)")


@pytest.fixture(params=backends_under_test())
def backend(request):
    """The backend name; every fastvae call in the test runs on it, on the test device."""
    with fastvae.use_backend(request.param), TEST_DEVICE:
        yield request.param


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)
