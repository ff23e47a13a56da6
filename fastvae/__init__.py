"""fastvae: fused kernels for the variational-autoencoder loss (see DESIGN.md)."""
from ._backends import available_backends, get_backend, set_backend, use_backend
from .functional import (ELBOTerms, bernoulli_nll, elbo_loss, gaussian_kl, gaussian_nll,
                         reparameterize)
from .modules import ELBOLoss

__version__ = "0.1.0"

__all__ = ["ELBOLoss", "ELBOTerms", "available_backends", "bernoulli_nll", "elbo_loss",
           "gaussian_kl", "gaussian_nll", "get_backend", "reparameterize", "set_backend",
           "use_backend"]
