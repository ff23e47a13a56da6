"""``ELBOLoss``: the module form of :func:`fastvae.elbo_loss`."""
from typing import Optional

from torch import Tensor, nn

from . import functional
from ._validation import (LIKELIHOODS, REDUCTIONS, check_beta, check_capacity, check_positive,
                          check_real, choice)


class ELBOLoss(nn.Module):
    """Negative ELBO criterion; ``forward(x, x_hat, mu, logvar, x_logvar=None, prior_mu=None,
    prior_logvar=None, x_logscale=None)`` returns :func:`fastvae.elbo_loss` with the options
    fixed here (``sigma`` for the Gaussian, ``scale`` for the Laplace likelihood, ``capacity``
    for the KL capacity C)."""

    def __init__(self, likelihood: str = "gaussian", sigma=None, beta=1.0, free_bits: float = 0.0,
                 reduction: str = "mean", scale=None, capacity=None):
        super().__init__()
        choice("likelihood", likelihood, LIKELIHOODS)
        choice("reduction", reduction, REDUCTIONS)
        for name, value in (("sigma", sigma), ("scale", scale)):
            if value is not None:
                check_positive(name, value)
        check_beta(beta)
        check_real("free_bits", free_bits, minimum=0.0)
        check_capacity(capacity)
        self.likelihood, self.sigma, self.scale, self.beta = likelihood, sigma, scale, beta
        self.free_bits, self.reduction, self.capacity = free_bits, reduction, capacity

    def forward(self, x: Tensor, x_hat: Tensor, mu: Tensor, logvar: Tensor,
                x_logvar: Optional[Tensor] = None, prior_mu: Optional[Tensor] = None,
                prior_logvar: Optional[Tensor] = None,
                x_logscale: Optional[Tensor] = None) -> Tensor:
        return functional.elbo_loss(
            x, x_hat, mu, logvar, likelihood=self.likelihood, x_logvar=x_logvar,
            sigma=self.sigma, x_logscale=x_logscale, scale=self.scale, beta=self.beta,
            free_bits=self.free_bits, prior_mu=prior_mu, prior_logvar=prior_logvar,
            reduction=self.reduction, capacity=self.capacity)

    def extra_repr(self) -> str:
        return (f"likelihood={self.likelihood!r}, sigma={self.sigma}, scale={self.scale}, "
                f"beta={self.beta}, free_bits={self.free_bits}, reduction={self.reduction!r}, "
                f"capacity={self.capacity}")
