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

BACKENDS = ("auto", "triton", "native", "reference")
_MODULES = {"reference": "fastvae.reference", "native": "fastvae._native", "triton": "fastvae._triton"}

_selected = None  # None until first use: then FASTVAE_BACKEND or 'auto'
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
    global _selected
    if _selected is None:
        _selected = _check_name(os.environ.get("FASTVAE_BACKEND", "auto"))
    return _selected


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


def _triton_runs_on(device_type):
    return device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve(device):
    """The concrete backend name for tensors on ``device`` under the current selection."""
    name = get_backend()
    if name == "triton":
        if not _triton_runs_on(device.type):
            raise ValueError(f"backend 'triton' needs CUDA tensors (got {device}); set "
                             "TRITON_INTERPRET=1 before importing fastvae to run it on CPU")
        return name
    if name != "auto":
        return name
    candidates = ("triton", "native") if device.type == "cuda" else ("native",)
    for candidate in candidates:
        if _loads(candidate):
            return candidate
    reasons = "; ".join(f"{c}: {_load_errors[c]}" for c in candidates)
    _warn_once(device.type, f"fastvae: no fused backend for {device.type} tensors ({reasons}); "
               "using the slow plain-PyTorch reference. Build the native extension with "
               "`pip install --no-build-isolation -e .`.")
    return "reference"
