"""Backend selection: which implementation of the fused ops runs for a given device.

'auto' sends CUDA tensors to Triton (else the CUDA build of the native extension) and CPU
tensors to the native C++ extension, falling back to the reference with a one-time warning
that says why. The choice is resolved in Python before an op is called and passed to it as a
string, so ``torch.compile`` sees a constant.
"""
import contextlib
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "reference")
_MODULES = {"reference": "fastvae.reference", "native": "fastvae._native", "triton": "fastvae._triton"}

# Read at import, validated on use: an unknown name in FASTVAE_BACKEND fails the first call.
# (Set eagerly so torch.compile never traces a first-use initialisation.)
_selected = os.environ.get("FASTVAE_BACKEND", "auto")
_load_errors = {}
_warned = set()


def _check_name(name):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    return name


def module(name):
    """The module implementing backend ``name``; raises RuntimeError saying why if unusable."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as error:
        raise RuntimeError(f"fastvae backend {name!r} is not available: {error}") from error


def _loads(name):
    if name not in _load_errors:
        try:
            module(name)
            _load_errors[name] = None
        except RuntimeError as error:
            _load_errors[name] = str(error.__cause__)
    return _load_errors[name] is None


def available_backends():
    """Names of the backends that can run here, e.g. ``['native', 'reference', 'triton']``."""
    return sorted(name for name in _MODULES if _loads(name))


def get_backend():
    """The selected backend name ('auto' unless set)."""
    return _check_name(_selected)


def set_backend(name):
    """Select the backend for all later calls: 'auto' | 'triton' | 'native' | 'reference'."""
    global _selected
    _selected = _check_name(name)


@contextlib.contextmanager
def use_backend(name):
    """Context manager selecting a backend for the calls inside it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _runs_on(name, device_type):
    return _loads(name) and device_type in module(name).DEVICE_TYPES


def resolve(device):
    """The concrete backend name for tensors on ``device`` under the current selection."""
    return _resolve(get_backend(), device.type)


@torch.compiler.assume_constant_result
def _resolve(name, device_type):
    if name != "auto":
        if not _loads(name):
            raise RuntimeError(f"fastvae backend {name!r} is not available: {_load_errors[name]}")
        if device_type not in module(name).DEVICE_TYPES:
            hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" \
                if name == "triton" else ""
            raise ValueError(f"backend {name!r} does not run on {device_type} tensors{hint}")
        return name
    candidates = ("triton", "native") if device_type == "cuda" else ("native",)
    for candidate in candidates:
        if _runs_on(candidate, device_type):
            return candidate
    reasons = "; ".join(f"{c}: {_load_errors[c] or 'not built for ' + device_type}"
                        for c in candidates)
    _warn_once(device_type, f"fastvae: no fused backend for {device_type} tensors ({reasons}); "
               "using the slow plain-PyTorch reference. Build the native extension with "
               "`pip install --no-build-isolation -e .`.")
    return "reference"
