"""The importance-weighted bound (Burda et al. 2016) with the standard or the doubly
reparameterised gradient (DReG, Tucker et al. 2018), and the many-sample estimate of log p(x)
built on it (docs/design.md §2).

With S samples ``z_s ~ q(z|x)`` and ``log w_s = log p(x|z_s) + log p(z_s) − log q(z_s|x)``, the
bound is ``log (1/S) Σ_s w_s``; it is at most log p(x), tightens as S grows, and equals the
single-sample ELBO estimate at S = 1.
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _ops, mixture
from ._common import IWAE_ROW_DIMS, Likelihood, Reduction, accumulation_dtype
from ._validation import (CATEGORICAL, ELBO_LIKELIHOODS, REDUCTIONS, check_count,
                          check_data, check_float_tensor, check_latents, check_same_device,
                          check_values, checking_values, choice)
from .categorical import check_categorical, check_categorical_values, per_sample_nll
from .functional import (_UNIT_INTERVAL_DATA, _as, _flat_latents, _flattened,
                         _gradients_wanted, _grouped, _latent_dtype, _theta, reparameterize)
from .mixture import GaussianMixture


class _DregTie(torch.autograd.Function):
    """Identity on z for the decoder, plus a zero log-weight offset for the bound. The bound's
    gradient with respect to the offset is ``−u_b·w̃[s, b]`` (u_b the row's weight in the
    loss), so normalising it over the samples recovers the weights w̃ exactly, whatever the
    upstream gradient: backward multiplies the decoder's gradient with respect to z by them."""

    @staticmethod
    def forward(ctx, z):
        ctx.set_materialize_grads(False)  # an unused tie must reach backward as None, not 0
        return z.view_as(z), z.new_zeros(z.shape[:2], dtype=accumulation_dtype(z))

    @staticmethod
    def backward(ctx, grad_z, grad_offset):
        if grad_z is None:
            return None
        if grad_offset is None:
            raise RuntimeError(
                "fastvae.dreg: the decoder input from dreg(z) received a gradient but its tie did "
                "not: pass the tie to iwae_loss(..., dreg=tie) and differentiate that loss")
        total = grad_offset.sum(0, keepdim=True)
        # A row with weight 0 in the loss has a zero decoder gradient from it as well.
        weights = torch.where(total != 0, grad_offset / total, torch.zeros_like(grad_offset))
        weights = weights.view(*weights.shape, *(1,) * (grad_z.dim() - 2))
        return (grad_z.to(weights.dtype) * weights).to(grad_z.dtype)


def dreg(z: Tensor):
    """The decoder's input for the DReG estimator, and the tie to pass to :func:`iwae_loss`.

    DReG gives the encoder the gradient ``Σ_s w̃_s² ∂log w_s/∂z_s · ∂z_s/∂φ`` (no score-function
    term) while the decoder keeps the IWAE gradient ``Σ_s w̃_s ∇_θ log w_s``: the decoder's path
    to z needs the weight w̃ once more than its parameters. Decode the first output instead of
    ``z``; in backward it multiplies the gradient reaching z through the decoder by w̃, which
    the tie carries back from the bound (no state is kept, so it works under torch.compile)::

        z = fastvae.reparameterize(mu, logvar, n_samples=S)   # [S, B, *latent]
        z_decoder, tie = fastvae.dreg(z)
        loss = fastvae.iwae_loss(x, decoder(z_decoder), z, mu, logvar, dreg=tie)

    Args:
        z: ``[S, B, *latent]`` samples of q(z|x).
    Returns:
        ``(z_decoder, tie)``: ``z`` itself (a view) and a ``[S, B]`` zero tensor. ``z_decoder``
        must feed only the decoder of this bound: any other loss on its output would get the
        same reweighting.
    """
    check_float_tensor("z", z)
    if z.dim() < 3:
        raise ValueError(f"z must be [S, B, *latent], got {tuple(z.shape)}")
    return _DregTie.apply(z)


def _check_bound_args(x, x_hat, z, mu, logvar, prior_mu, prior_logvar, tie):
    check_data(x, x_hat, "x_hat")
    check_latents(mu, logvar, prior_mu, prior_logvar)
    check_float_tensor("z", z)
    if x_hat.dim() != x.dim() + 1:
        raise ValueError(f"x_hat must be [S, B, *event] for x of {tuple(x.shape)}, got "
                         f"{tuple(x_hat.shape)}")
    if z.shape != (x_hat.shape[0], *mu.shape):
        raise ValueError(f"z must be [S, *mu.shape] = [{x_hat.shape[0]}, "
                         f"{', '.join(map(str, mu.shape))}] (S from x_hat), got {tuple(z.shape)}")
    if mu.shape[0] != x.shape[0]:
        raise ValueError(f"mu must be [B, *latent] with B = {x.shape[0]} (x's first dim), got "
                         f"{tuple(mu.shape)}")
    if tie is not None:
        check_float_tensor("dreg", tie)
        if tie.shape != z.shape[:2]:
            raise ValueError(f"dreg must be the tie of fastvae.dreg(z), [S, B] = "
                             f"{list(z.shape[:2])}, got {tuple(tie.shape)}")
        if torch.is_grad_enabled() and not tie.requires_grad:
            raise ValueError("dreg must be the tie returned by fastvae.dreg(z) for a z that "
                             "requires grad")


def _mixture_offset(z, mu, logvar, prior, dtype):
    """``[S, B]``: log p(z) − log N(z; 0, I) for a mixture prior. The op itself adds the
    standard normal's log density; this offset to the log weights makes it the mixture's."""
    log_ratio = mixture.log_ratio(z, mu, logvar, prior)  # log q(z|x) − log p(z)
    z, mu, logvar = (t.to(dtype) for t in (z, mu, logvar))
    residual = z - mu
    q_over_standard = 0.5 * (z * z - residual * residual * torch.exp(-logvar) - logvar)
    return q_over_standard.flatten(2).sum(-1) - log_ratio


def _categorical_decoder(target, logits, class_dim, scales):
    """The categorical likelihood in the bound: its per-sample log-likelihood ``[S, B]`` from
    the categorical op (an offset to the log weights), and an empty event standing in for x
    and x_hat in the bound op. It has no decoder scale: ``scales`` must all be None."""
    for name, value in scales.items():
        if value is not None:
            raise ValueError(f"{name} does not belong to likelihood 'categorical'")
    layout = check_categorical(target, logits, -1 if class_dim is None else class_dim)
    if logits.dim() != target.dim() + 2:
        raise ValueError(f"logits must be [S, B, ...] with a sample dim for the bound, got "
                         f"{tuple(logits.shape)} for target {tuple(target.shape)}")
    check_same_device(target=target, logits=logits)
    if checking_values():
        check_categorical_values(target, logits, layout)
    empty = logits.new_empty(logits.shape[0], target.shape[0], 0)
    return empty[0], empty, -per_sample_nll(target, logits, layout)


def _bound(x, decoder, z, latents, tie, prior, likelihood, reduction, log_px=None):
    """Normalise shapes and run the bound op. ``decoder`` is (x_hat, θ, θ constant),
    ``latents`` (mu, logvar, prior_mu, prior_logvar) as given, ``prior`` a mixture or None."""
    x_hat, theta, theta_const = decoder  # log_px: a likelihood outside the op, [S, B] or None
    dtype = _latent_dtype(z, *latents)
    x2, x_hat3 = _flattened(x, 1), _flattened(x_hat, 2)
    theta3 = None if theta is None else _grouped(theta, x_hat.shape, (1, 1, x.dim() - 1))
    z3 = _flattened(_as(z, dtype), 2)
    if tie is not None:  # DReG: no score-function term, so q's parameters get no direct path
        latents = (latents[0].detach(), latents[1].detach()) + tuple(latents[2:])
    loss_dtype = accumulation_dtype(x, x_hat, theta, z3)
    offsets = [_as(t, loss_dtype) for t in (tie, log_px) if t is not None]
    if prior is not None:
        if tie is not None:  # DReG weights the prior's path to z by w̃² too: a tie of its own
            z, own_tie = _DregTie.apply(z)
            offsets.append(_as(own_tie, loss_dtype))
        offsets.append(_mixture_offset(z, *latents[:2], prior, loss_dtype))
    offset = sum(offsets[1:], offsets[0]) if offsets else None
    inputs = (x2, x_hat3, theta3, z3) + _flat_latents(*latents, dtype) + (offset,)
    needs_grad = _gradients_wanted(inputs, IWAE_ROW_DIMS, reduction)
    return _ops.iwae(*inputs, None, int(likelihood), float(theta_const), int(reduction),
                     tie is not None, needs_grad, device=x.device)


def iwae_loss(x: Tensor, x_hat: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, *,
              likelihood: str = "gaussian", x_logvar: Optional[Tensor] = None, sigma=None,
              x_logscale: Optional[Tensor] = None, scale=None,
              prior_mu: Optional[Tensor] = None, prior_logvar: Optional[Tensor] = None,
              prior: Optional[GaussianMixture] = None, dreg: Optional[Tensor] = None,
              reduction: str = "mean", class_dim: Optional[int] = None) -> Tensor:
    """The negative importance-weighted bound, ``log S − logsumexp_s log w_s``, in nats,
    fused in one op: it never copies ``x`` S times or stores ``[S, B, *event]`` temporaries.

    Args:
        x: data ``[B, *event]``.
        x_hat: decoder outputs ``[S, B, *event]`` for the samples ``z`` (mean, location or
            logits, as in :func:`fastvae.elbo_loss`).
        z: the samples ``[S, B, *latent]`` the decoder saw, e.g.
            ``reparameterize(mu, logvar, n_samples=S)``; gradients flow back through it.
        mu, logvar: q(z|x) as ``[B, *latent]``, a diagonal Gaussian.
        likelihood, x_logvar, sigma, x_logscale, scale, prior_mu, prior_logvar: as in
            :func:`fastvae.elbo_loss` (a decoder scale may also be ``[S, B, *event]``).
        prior: a :class:`fastvae.GaussianMixture` prior instead of a Gaussian one; its log
            density enters the log weights (streamed over the components).
        dreg: None for the standard IWAE gradient, or the tie of :func:`fastvae.dreg` for
            DReG (then ``x_hat`` must be decoded from that function's first output).
        class_dim: with likelihood 'categorical' (``x`` class indices, ``x_hat`` logits
            ``[S, B, *event, K]``, or ``[S, B, K, *event]`` with class_dim=1), as in
            :func:`fastvae.categorical_nll`; its per-sample NLL comes from the categorical op.
        reduction: 'mean' over datapoints, 'sum', or 'none' → ``[B]``.
    Returns:
        The loss (float32; float64 for float64 inputs).
    """
    likelihood = choice("likelihood", likelihood, ELBO_LIKELIHOODS)
    reduction = choice("reduction", reduction, REDUCTIONS)
    scales = {"x_logvar": x_logvar, "sigma": sigma, "x_logscale": x_logscale, "scale": scale}
    log_px = None
    if likelihood == CATEGORICAL:
        x, x_hat, log_px = _categorical_decoder(x, x_hat, class_dim, scales)
        likelihood = Likelihood.GAUSSIAN  # of the empty event: no terms
    elif class_dim is not None:
        raise ValueError("class_dim belongs to likelihood 'categorical' only")
    _check_bound_args(x, x_hat, z, mu, logvar, prior_mu, prior_logvar, dreg)
    if prior is not None:
        if prior_mu is not None or prior_logvar is not None:
            raise ValueError("give either a Gaussian prior (prior_mu, prior_logvar) or a "
                             "mixture prior (prior), not both")
        mixture.check_mixture(prior, mu.shape[1:])
    theta, const = _theta(likelihood, scales, x_hat.shape)
    check_same_device(x=x, x_hat=x_hat, z=z, mu=mu, logvar=logvar, x_log_scale=theta,
                      prior_mu=prior_mu, prior_logvar=prior_logvar, dreg=dreg,
                      **({} if prior is None else prior._asdict()))
    if checking_values():
        check_values(("x",) if likelihood in _UNIT_INTERVAL_DATA else (), x=x, x_hat=x_hat, z=z,
                     mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar,
                     **scales, **({} if prior is None else prior._asdict()))
    return _bound(x, (x_hat, theta, const), z, (mu, logvar, prior_mu, prior_logvar), dreg, prior,
                  likelihood, reduction, log_px).loss


@torch.no_grad()
def log_likelihood(x: Tensor, mu: Tensor, logvar: Tensor, decoder: Callable[[Tensor], Tensor],
                   *, n_samples: int = 5000, chunk_size: int = 100,
                   generator: Optional[torch.Generator] = None, **likelihood_options) -> Tensor:
    """An estimate of log p(x) in nats per datapoint, ``[B]``: the importance-weighted bound
    with many samples (Burda et al. 2016 use S = 5000), evaluated in chunks of samples with a
    running log-sum-exp, so at most ``chunk_size`` decoder outputs are held at once (under
    ``torch.no_grad()``, as for evaluation: with gradients enabled autograd keeps every chunk's
    graph until backward).

    Args:
        x: data ``[B, *event]``; mu, logvar: q(z|x) as ``[B, *latent]``.
        decoder: maps ``[N, *latent]`` to the decoder output ``[N, *event]``.
        n_samples: S ≥ 1; chunk_size: samples per chunk (≥ 1).
        generator: draws each chunk's noise seed (default: the device's default generator).
        likelihood_options: ``likelihood``, the decoder scale and the prior, as in
            :func:`iwae_loss` (a decoder scale must broadcast to ``[chunk, B, *event]``).
    """
    check_count("n_samples", n_samples)
    check_count("chunk_size", chunk_size)
    check_latents(mu, logvar, None, None)
    total = None
    for start in range(0, n_samples, chunk_size):
        count = min(chunk_size, n_samples - start)
        z = reparameterize(mu, logvar, count, generator=generator)
        x_hat = decoder(z.flatten(0, 1)).unflatten(0, (count, x.shape[0]))
        negative_bound = iwae_loss(x, x_hat, z, mu, logvar, reduction="none",
                                   **likelihood_options)
        chunk = math.log(count) - negative_bound  # logsumexp over the chunk's log weights
        total = chunk if total is None else torch.logaddexp(total, chunk)
    return total - math.log(n_samples)
