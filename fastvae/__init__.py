"""fastvae: fused kernels for the variational-autoencoder loss (see docs/design.md)."""
from .backends import available_backends, get_backend, set_backend, use_backend
from .categorical import categorical_nll
from .functional import (ELBOTerms, bernoulli_nll, continuous_bernoulli_nll, elbo_loss,
                         gaussian_kl, gaussian_nll, laplace_nll, reparameterize)
from .importance import dreg, iwae_loss, log_likelihood
from .mixture import GaussianMixture, mixture_kl
from .modules import ELBOLoss
from ._validation import set_validate_values, validate_values

__version__ = "0.2.0"

__all__ = ["ELBOLoss", "ELBOTerms", "GaussianMixture", "available_backends", "bernoulli_nll",
           "categorical_nll", "continuous_bernoulli_nll", "dreg", "elbo_loss", "gaussian_kl",
           "gaussian_nll", "get_backend", "iwae_loss", "laplace_nll", "log_likelihood",
           "mixture_kl", "reparameterize", "set_backend", "set_validate_values", "use_backend",
           "validate_values"]
