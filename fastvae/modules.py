"""``ELBOLoss``: the module form of :func:`fastvae.elbo_loss`."""
from typing import Optional

from torch import Tensor, nn

from . import functional
from ._validation import LIKELIHOODS, REDUCTIONS, check_beta, check_choice, check_real, check_sigma


class ELBOLoss(nn.Module):
    """Negative ELBO criterion; ``forward(x, x_hat, mu, logvar, x_logvar=None, prior_mu=None,
    prior_logvar=None)`` returns :func:`fastvae.elbo_loss` with the options fixed here."""

    def __init__(self, likelihood: str = "gaussian", sigma=None, beta=1.0, free_bits: float = 0.0,
                 reduction: str = "mean"):
        super().__init__()
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_choice("reduction", reduction, REDUCTIONS)
        if sigma is not None:
            check_sigma(sigma)
        check_beta(beta)
        check_real("free_bits", free_bits, minimum=0.0)
        self.likelihood, self.sigma, self.beta = likelihood, sigma, beta
        self.free_bits, self.reduction = free_bits, reduction

    def forward(self, x: Tensor, x_hat: Tensor, mu: Tensor, logvar: Tensor,
                x_logvar: Optional[Tensor] = None, prior_mu: Optional[Tensor] = None,
                prior_logvar: Optional[Tensor] = None) -> Tensor:
        return functional.elbo_loss(
            x, x_hat, mu, logvar, likelihood=self.likelihood, x_logvar=x_logvar, sigma=self.sigma,
            beta=self.beta, free_bits=self.free_bits, prior_mu=prior_mu,
            prior_logvar=prior_logvar, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"likelihood={self.likelihood!r}, sigma={self.sigma}, beta={self.beta}, "
                f"free_bits={self.free_bits}, reduction={self.reduction!r}")
