"""Every shared case runs once per backend under test.

``FASTVAE_TEST_BACKENDS`` (comma-separated) picks the backends; by default every backend that
``fastvae.available_backends`` lists for the test device (``FASTVAE_TEST_DEVICE``, default
cpu; 'triton' runs on CPU only under ``TRITON_INTERPRET=1``). Tensors a test creates inside
the ``backend`` fixture land on that device.
"""
import contextlib
import os

import pytest
import torch

import fastvae
from cases import ON_CUDA, TEST_DEVICE

cuda_only = pytest.mark.skipif(not ON_CUDA, reason="a CUDA-only behaviour: run the suite with "
                               "FASTVAE_TEST_DEVICE=cuda on a GPU")
cpu_only = pytest.mark.skipif(ON_CUDA, reason="about CPU tensors only; its CUDA counterpart "
                              "runs in the CUDA tests")


@contextlib.contextmanager
def intra_op_threads(count):
    """``torch.set_num_threads(count)`` inside the block. Where the native extension is built,
    first checks that its kernels' parallel loops now run on ``count`` threads: kernels whose
    loops stayed serial would pass every comparison of 1 against 2 threads trivially."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        if "native" in fastvae.available_backends("cpu"):
            used = torch.ops.fastvae_native._parallel_threads()
            assert used == count, (
                f"the native kernels' parallel loops ran on {used} threads under "
                f"torch.set_num_threads({count}): fastvae._C was built without OpenMP or with "
                "an OpenMP runtime other than torch's (CMakeLists.txt)")
        yield
    finally:
        torch.set_num_threads(before)


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
