"""fastvae's Triton kernels, installed as ``fastvae.kernels``; ``fastvae._triton`` launches them.

Modules: ``reparameterize`` (sampling with in-kernel noise), ``elbo`` (the fused loss), and
the shared ``_launch`` / ``_convert``.
"""
