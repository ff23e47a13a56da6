"""The one builder of the loss op's arguments for tests that call an op or a backend directly.

The registered op ``torch.ops.fastvae.elbo`` takes, in order, the 7 differentiable tensors of
``fastvae._common.INPUTS`` (op input i is gradient slot i), then ``beta, capacity, grad_scale,
likelihood, x_log_scale_const, free_bits, reduction, needs_grad`` and a trailing backend name;
a backend's ``elbo`` and ``torch.ops.fastvae_native.elbo`` take the same without the name.
Both return the 11 tensors of ``OUTPUTS``.
"""
import dataclasses
from typing import Optional

import torch

from cases import TEST_DEVICE
from fastvae._common import INPUTS, Likelihood, Reduction, accumulation_dtype

OUTPUTS = ("loss", "nll", "kl", "kl_term") + tuple(f"grad_{name}" for name in INPUTS)
# The dim of each input that holds the datapoints ([B, D], [S, B, D], [Sl, Bl, Dl], [B or 1, d]).
ROW_DIM = {"x": 0, "x_hat": 1, "x_log_scale": 1, "mu": 0, "logvar": 0, "prior_mu": 0,
           "prior_logvar": 0}


@dataclasses.dataclass
class ElboArgs:
    inputs: dict                      # slot name (INPUTS) -> tensor or None
    beta: torch.Tensor
    grad_scale: Optional[torch.Tensor]
    likelihood: Likelihood
    x_log_scale_const: float
    free_bits: float
    reduction: Reduction
    needs_grad: list
    capacity: Optional[torch.Tensor] = None

    def backend_args(self) -> tuple:
        """The arguments of a backend's ``elbo`` and of ``torch.ops.fastvae_native.elbo``."""
        return (*(self.inputs[name] for name in INPUTS), self.beta, self.capacity, self.grad_scale,
                int(self.likelihood), float(self.x_log_scale_const), float(self.free_bits),
                int(self.reduction), list(self.needs_grad))

    def op_args(self, backend: str) -> tuple:
        """The arguments of the registered op ``torch.ops.fastvae.elbo``."""
        return self.backend_args() + (backend,)

    def detached(self) -> "ElboArgs":
        """The same values, no tensor requiring grad (for the raw native op)."""
        plain = {n: None if t is None else t.detach() for n, t in self.inputs.items()}
        return dataclasses.replace(self, inputs=plain, beta=self.beta.detach())

    def replace(self, **changes) -> "ElboArgs":
        return dataclasses.replace(self, **changes)


def named_outputs(outputs) -> dict:
    outputs = tuple(outputs)
    assert len(outputs) == len(OUTPUTS), f"the loss op returns {len(OUTPUTS)} tensors, got {len(outputs)}"
    return dict(zip(OUTPUTS, outputs))


def elbo_args(*, batch=5, features=6, latent=3, samples=2, dtype=torch.float32, hat_dtype=None,
              latent_dtype=None, log_scale="SBD", prior=None, likelihood="gaussian",
              reduction="mean", free_bits=0.0, grad_scale=None, beta=0.7, beta_grad=False,
              needs="all", requires_grad=False, x_requires_grad=True, x_log_scale_const=-0.3,
              capacity=None, seed=0, device=None) -> ElboArgs:
    """Arguments of the loss op for ``x [B, D]``, ``x_hat [S, B, D]``, ``mu [B, d]``.

    log_scale: None (the constant ``x_log_scale_const``) or a layout of ``[Sl, Bl, Dl]``
        written as three characters, each the dim's letter (full) or '1' (broadcast):
        'SBD', '1BD', '11D', 'S11', '111', ...
    prior: None | 'shared' (``[1, d]``) | 'datapoint' (``[B, d]``).
    grad_scale: None, or True for random per-row weights in the loss dtype.
    capacity: None, or a float C, passed as a 0-dim tensor in the loss dtype.
    needs: 'all' (every tensor given), 'api' (what the public API passes: the tensors that
        require grad, and under reduction NONE only those with one row per datapoint), or a
        list of 7 bools.
    requires_grad: make every floating input a leaf requiring grad (opcheck tests autograd).
    """
    device = device or TEST_DEVICE
    likelihood, reduction = _enum(Likelihood, likelihood), _enum(Reduction, reduction)
    g = torch.Generator(device).manual_seed(seed)
    latent_dtype = latent_dtype or dtype

    def draw(*shape, scale=1.0, dt=dtype):
        return (torch.randn(shape, generator=g, dtype=torch.float64, device=device) * scale).to(dt)

    if likelihood == Likelihood.BERNOULLI:
        assert log_scale is None, "the Bernoulli likelihood takes no log-scale"
        x = torch.rand(batch, features, generator=g, dtype=torch.float64, device=device).to(dtype)
    else:
        x = draw(batch, features)
    full = {"S": samples, "B": batch, "D": features, "1": 1}
    inputs = {"x": x, "x_hat": draw(samples, batch, features, dt=hat_dtype or dtype),
              "x_log_scale": None if log_scale is None else
              draw(*(full[c] for c in log_scale), scale=0.5),
              "mu": (draw(batch, latent, dt=torch.float64) * _spread(latent, device)).to(latent_dtype),
              "logvar": draw(batch, latent, scale=0.5, dt=latent_dtype),
              "prior_mu": None, "prior_logvar": None}
    if prior is not None:
        rows = {"shared": 1, "datapoint": batch}[prior]
        inputs["prior_mu"] = draw(rows, latent, scale=0.5, dt=latent_dtype)
        inputs["prior_logvar"] = draw(rows, latent, scale=0.5, dt=latent_dtype)
    if requires_grad:
        for name, tensor in inputs.items():
            if tensor is not None and (name != "x" or x_requires_grad):
                tensor.requires_grad_()
    loss_dtype = accumulation_dtype(*inputs.values())
    beta = torch.tensor(beta, dtype=loss_dtype, device=device, requires_grad=beta_grad)
    if grad_scale is True:
        grad_scale = torch.rand(batch, generator=g, dtype=torch.float64, device=device).to(loss_dtype)
    if capacity is not None:
        capacity = torch.tensor(capacity, dtype=loss_dtype, device=device)
    return ElboArgs(inputs, beta, grad_scale, likelihood, x_log_scale_const, free_bits, reduction,
                    _needs(needs, inputs, reduction, batch, x_requires_grad), capacity)


def _spread(latent, device):
    """Column scales of mu from 0.2 to 2: with free bits some dims are clamped, some active."""
    return torch.linspace(0.2, 2.0, latent, dtype=torch.float64, device=device)


def _enum(kind, value):
    return kind[value.upper()] if isinstance(value, str) else kind(value)


def _needs(needs, inputs, reduction, batch, x_requires_grad):
    if isinstance(needs, (list, tuple)):
        assert len(needs) == len(INPUTS)
        return list(needs)
    present = {n: t is not None and (n != "x" or x_requires_grad) for n, t in inputs.items()}
    if needs == "all":
        return [present[n] for n in INPUTS]
    assert needs == "api", needs
    return [present[n] and (reduction != Reduction.NONE or inputs[n].shape[ROW_DIM[n]] == batch)
            for n in INPUTS]
