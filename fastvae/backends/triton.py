"""The Triton backend: the contract of the reference backend (``reference.py`` here) run by the
kernels in ``fastvae.kernels``. Importing it fails (ImportError: backend unavailable) without
Triton.

It runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
set before Triton is imported), which is how the tests exercise it. Launch configs come from a
heuristic per shape class (the first call on a shape compiles, without timing runs);
``FASTVAE_AUTOTUNE=1`` autotunes them instead (see ``fastvae.kernels._launch``).
"""
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from ..kernels._launch import INTERPRETED
from ..kernels.categorical import categorical
from ..kernels.elbo import elbo
from ..kernels.iwae import iwae
from ..kernels.mixture import mixture_log_ratio, mixture_log_ratio_backward
from ..kernels.reparameterize import reparameterize_backward, reparameterize_forward
from ..kernels.scale import scale_

DEVICE_TYPES = ("cuda", "cpu") if INTERPRETED else ("cuda",)
RECORDS_AUTOGRAD = False

__all__ = ["DEVICE_TYPES", "RECORDS_AUTOGRAD", "categorical", "elbo", "iwae",
           "mixture_log_ratio", "mixture_log_ratio_backward", "reparameterize_backward",
           "reparameterize_forward", "scale_"]
