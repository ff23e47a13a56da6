"""The native backend: C++ CPU kernels (and CUDA kernels when built) in the ``fastvae._C``
extension, registered as ``torch.ops.fastvae_native.*``. See ``fastvae.reference`` for the
contract of the three functions."""
import torch

from ._ops import elbo_shapes, reparameterize_backward_shapes, reparameterize_shapes

try:
    from . import _C
except ImportError as error:
    raise ImportError(
        "fastvae's native extension fastvae._C is not built or does not match the installed "
        f"torch ({error}); build it from the source tree, with torch already installed, by "
        "`pip install --no-build-isolation -e .`") from error

DEVICE_TYPES = ("cpu", "cuda") if _C.WITH_CUDA else ("cpu",)

_ops = torch.ops.fastvae_native


def reparameterize_forward(mu, logvar, seed, n_samples):
    return _ops.reparameterize(mu, logvar, seed, n_samples)


def reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar):
    return _ops.reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar)


def elbo(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
         free_bits, bernoulli, reduction, grad_scale, needs_grad):
    loss, nll, kl, kl_term, *grads = _ops.elbo(
        x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
        free_bits, bernoulli, reduction, grad_scale, list(needs_grad))
    return loss, nll, kl, kl_term, tuple(grads)


# Shapes only, for torch.compile and opcheck on the native ops themselves.
torch.library.register_fake("fastvae_native::reparameterize", reparameterize_shapes)
torch.library.register_fake("fastvae_native::reparameterize_backward",
                            reparameterize_backward_shapes)
torch.library.register_fake("fastvae_native::elbo", elbo_shapes)
