"""The Triton backend: the contract of ``fastvae.reference`` run by the kernels in
``fastvae.kernels``. Importing it fails (ImportError: backend unavailable) without Triton.

It runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how the tests exercise it. The first call per shape
autotunes (timing runs with host syncs): warm up before capturing a CUDA graph.
"""
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from .kernels._launch import INTERPRETED
from .kernels.elbo import elbo
from .kernels.reparameterize import reparameterize_backward, reparameterize_forward

DEVICE_TYPES = ("cuda", "cpu") if INTERPRETED else ("cuda",)

__all__ = ["DEVICE_TYPES", "elbo", "reparameterize_backward", "reparameterize_forward"]
