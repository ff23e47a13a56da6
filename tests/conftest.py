"""Every shared case runs once per backend under test.

``FASTVAE_TEST_BACKENDS`` (comma-separated) picks the backends; by default every available
backend that runs on the test device (``FASTVAE_TEST_DEVICE``, default cpu; 'triton' runs on
CPU only under ``TRITON_INTERPRET=1``). Tensors a test creates land on that device.
"""
import os

import pytest
import torch

import fastvae
from cases import TEST_DEVICE
from fastvae import _backends


def backends_under_test():
    chosen = os.environ.get("FASTVAE_TEST_BACKENDS")
    if chosen:
        return [name.strip() for name in chosen.split(",") if name.strip()]
    return [name for name in fastvae.available_backends()
            if TEST_DEVICE.type in _backends.module(name).DEVICE_TYPES]


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
