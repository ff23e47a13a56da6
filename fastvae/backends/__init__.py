"""Backend selection: which implementation of the fused ops runs for a given device.

'auto' sends CUDA tensors to Triton (else the CUDA build of the native extension) and CPU
tensors to the native C++ extension, falling back to the reference with a one-time warning
that says why. A backend module is imported on first use (Triton's import is slow), and the
answer is cached per (selection, device type): a call pays one dict lookup. The name is passed
to the ops as a string, so ``torch.compile`` sees a constant.
"""
import contextlib
import importlib
import os
import warnings

import torch

BACKENDS = ("auto", "triton", "native", "reference")
_MODULES = {"reference": "fastvae.backends.reference", "native": "fastvae.backends.native",
            "triton": "fastvae.backends.triton"}

# Read at import, validated on use: an unknown name in FASTVAE_BACKEND fails the first call.
_selected = os.environ.get("FASTVAE_BACKEND", "auto")
_load_errors = {}
_warned = set()
_resolved = {}  # (selection, device type) -> (name, module)


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


def _device_types_here():
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def available_backends(device=None):
    """Names of the backends that can run on ``device`` (a device or its type; None: on any
    device this machine has), e.g. ``['native', 'reference']`` on a CPU-only machine."""
    types = (torch.device(device).type,) if device is not None else _device_types_here()
    return sorted(name for name in _MODULES
                  if _loads(name) and any(t in module(name).DEVICE_TYPES for t in types))


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


def implementation(device):
    """``(name, module)`` of the backend that runs tensors on ``device`` under the selection."""
    key = (_selected, device.type)
    found = _resolved.get(key)
    if found is None:
        name = resolve_name(*key)
        found = _resolved[key] = (name, module(name))
    return found


def resolve(device):
    """The concrete backend name for tensors on ``device`` under the current selection."""
    return implementation(device)[0]


def resolve_name(selection, device_type):
    """The concrete backend for a selection and device type (uncached)."""
    return _chosen(_check_name(selection), device_type)


# torch.compile calls resolve_name at trace time and keeps its answer as a constant (what
# torch.compiler.assume_constant_result marks; set directly, because that function imports
# torch._dynamo, which would double the cost of `import fastvae`).
resolve_name._dynamo_marked_constant = True


def _chosen(selection, device_type):
    if selection != "auto":
        if not _loads(selection):
            raise RuntimeError(f"fastvae backend {selection!r} is not available: "
                               f"{_load_errors[selection]}")
        if device_type not in module(selection).DEVICE_TYPES:
            hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" \
                if selection == "triton" else ""
            raise ValueError(f"backend {selection!r} does not run on {device_type} tensors{hint}")
        return selection
    candidates = ("triton", "native") if device_type == "cuda" else ("native",)
    for candidate in candidates:
        if _loads(candidate) and device_type in module(candidate).DEVICE_TYPES:
            return candidate
    reasons = "; ".join(f"{c}: {_load_errors[c] or 'not built for ' + device_type}"
                        for c in candidates)
    _warn_once(device_type, f"fastvae: no fused backend for {device_type} tensors ({reasons}); "
               "using the slow plain-PyTorch reference. Build the native extension with "
               "`pip install --no-build-isolation -e .`.")
    return "reference"


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=5)
