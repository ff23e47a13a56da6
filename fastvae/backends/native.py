"""The native backend: C++ CPU kernels (and CUDA kernels when built) in the ``fastvae._C``
extension, registered as ``torch.ops.fastvae_native.*``. The contract of the functions is in
``fastvae.backends.reference``; here they are the extension's ops themselves."""
import torch

from .. import _shapes

try:
    from .. import _C
except ImportError as error:
    raise ImportError(
        "fastvae's native extension fastvae._C is not built or does not match the installed "
        f"torch ({error}); build it from the source tree, with torch already installed, by "
        "`pip install --no-build-isolation -e .`") from error

DEVICE_TYPES = ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)
# The ops carry their autograd in C++ (csrc/autograd.cpp): an eager call enters no Python
# between the op and its kernel, in forward or backward.
RECORDS_AUTOGRAD = True

# The overloads themselves: calling the packet would resolve the overload again on every call.
_ops = torch.ops.fastvae_native
reparameterize_forward = _ops.reparameterize.default
reparameterize_backward = _ops.reparameterize_backward.default
elbo = _ops.elbo.default
iwae = _ops.iwae.default
scale_ = _ops.scale_.default
mixture_log_ratio = _ops.mixture_log_ratio.default
mixture_log_ratio_backward = _ops.mixture_log_ratio_backward.default
categorical = _ops.categorical.default
# The elbo op returning its loss alone (the op itself, called through a binding that wraps one
# output instead of eleven: fastvae._ops.elbo_loss).
elbo_loss = _C.elbo_loss

# Shapes only, for torch.compile and opcheck on the native ops themselves.
torch.library.register_fake("fastvae_native::reparameterize", _shapes.reparameterize)
torch.library.register_fake("fastvae_native::reparameterize_backward",
                            _shapes.reparameterize_backward)
torch.library.register_fake("fastvae_native::elbo", _shapes.elbo)
torch.library.register_fake("fastvae_native::iwae", _shapes.iwae)
torch.library.register_fake("fastvae_native::scale_", _shapes.scale_)
torch.library.register_fake("fastvae_native::mixture_log_ratio", _shapes.mixture_log_ratio)
torch.library.register_fake("fastvae_native::mixture_log_ratio_backward",
                            _shapes.mixture_log_ratio_backward)
torch.library.register_fake("fastvae_native::categorical", _shapes.categorical)
