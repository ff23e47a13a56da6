"""A mixture-of-Gaussians prior for the KL term (docs/design.md §1): learned components, or
the VampPrior (Tomczak & Welling 2018), whose components are the encoder's outputs on learned
pseudo-inputs. The KL to a mixture has no closed form; it is estimated with the sample itself,
``log q(z|x) − log p(z)``, where ``log p(z)`` is a log-sum-exp over the components, streamed
over them by the kernels (no ``[B, K, d]`` tensor).
"""
from typing import NamedTuple

from torch import Tensor

from . import _ops
from ._validation import check_float_tensor, check_latents, check_same_device
from .functional import _as, _flattened, _latent_dtype


class GaussianMixture(NamedTuple):
    """``p(z) = Σ_k softmax(logits)_k · N(z; means[k], diag e^logvars[k])``.

    ``means``, ``logvars``: ``[K, *latent]`` (K ≥ 1); ``logits``: ``[K]``, the unnormalised
    log mixture weights. All three may require grad (for a VampPrior, ``means`` and
    ``logvars`` are the encoder's outputs on the pseudo-inputs, and the gradient reaches them)."""
    means: Tensor
    logvars: Tensor
    logits: Tensor


def check_mixture(prior, latent_shape):
    """Raises unless ``prior`` is a GaussianMixture whose components are ``[K, *latent_shape]``."""
    if not isinstance(prior, GaussianMixture):
        raise TypeError(f"prior must be a fastvae.GaussianMixture, got {type(prior).__name__}")
    for name in GaussianMixture._fields:
        check_float_tensor(name, getattr(prior, name))
    means, logvars, logits = prior
    if logits.dim() != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be [K] with K >= 1 components, got {tuple(logits.shape)}")
    expected = (logits.shape[0], *latent_shape)
    for name, tensor in (("means", means), ("logvars", logvars)):
        if tensor.shape != expected:
            raise ValueError(f"{name} must be [K, *latent] = {list(expected)} (K from logits, "
                             f"latent from mu), got {tuple(tensor.shape)}")


def log_ratio(z: Tensor, mu: Tensor, logvar: Tensor, prior: GaussianMixture) -> Tensor:
    """``[S, B]``: log q(z_s|x) − log p(z_s) for ``z`` ``[S, B, *latent]`` (checked)."""
    dtype = _latent_dtype(z, mu, logvar, *prior)
    flat = [_flattened(_as(t, dtype), lead) for t, lead in
            ((z, 2), (mu, 1), (logvar, 1), (prior.means, 1), (prior.logvars, 1))]
    return _ops.mixture_log_ratio(*flat, _as(prior.logits, dtype).contiguous())[0]


def mixture_kl(z: Tensor, mu: Tensor, logvar: Tensor, prior: GaussianMixture) -> Tensor:
    """The Monte Carlo KL estimate to a mixture prior in nats per datapoint, ``[B]``: the mean
    over samples of ``log q(z|x) − log p(z)``, q = N(mu, e^logvar) diagonal.

    Args:
        z: the sample(s) of q, ``[B, *latent]`` or ``[S, B, *latent]`` (e.g. from
            :func:`fastvae.reparameterize`); gradients flow back through it.
        mu, logvar: ``[B, *latent]``.
        prior: a :class:`GaussianMixture` with components ``[K, *latent]``.
    """
    check_latents(mu, logvar, None, None)
    check_float_tensor("z", z)
    if z.shape != mu.shape and z.shape[1:] != mu.shape:
        raise ValueError(f"z must be mu's shape {tuple(mu.shape)} or [S, "
                         f"{', '.join(map(str, mu.shape))}], got {tuple(z.shape)}")
    check_mixture(prior, mu.shape[1:])
    check_same_device(z=z, mu=mu, logvar=logvar, means=prior.means, logvars=prior.logvars,
                      logits=prior.logits)
    samples = z if z.dim() > mu.dim() else z.unsqueeze(0)
    return log_ratio(samples, mu, logvar, prior).mean(0)
