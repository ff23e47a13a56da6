"""fastvae's Triton kernels, installed as ``fastvae.kernels`` (see ``fastvae._triton``)."""
from .elbo import elbo
from .reparameterize import reparameterize_backward, reparameterize_forward
from .scale import scale_by_upstream

__all__ = ["elbo", "reparameterize_backward", "reparameterize_forward", "scale_by_upstream"]
