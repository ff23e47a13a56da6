"""fastvae's Triton kernels, installed as ``fastvae.kernels``; ``fastvae.backends.triton``
exposes them as a backend.

Modules: ``reparameterize`` (sampling with in-kernel noise), ``elbo`` (the fused loss, its
per-element likelihood maths in ``likelihoods``), ``iwae`` (the importance-weighted bound, on
elbo's event helpers), ``scale`` (the in-place upstream scaling), and the shared ``_launch``
(interpreter, launch configs) and ``_convert`` (dtype conversions).
"""
