"""The public functional API (DESIGN.md §2). All losses are in nats.

Each function validates its arguments, brings them to the normalised shapes the backends take
(see ``fastvae.reference``), resolves the backend for the inputs' device and calls one op.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backends, _ops
from .reference import accumulation_dtype, reduce_rows
from ._validation import (LIKELIHOODS, REDUCTIONS, check_beta, check_broadcasts_to, check_choice,
                          check_float_tensor, check_real, check_same_device, check_same_shape,
                          check_seed, check_sigma)


class ELBOTerms(NamedTuple):
    """``loss`` (differentiable) and its detached parts ``nll`` and ``kl``, all reduced alike.

    ``kl`` is the analytic KL before free bits, so ``nll + kl`` is the −ELBO itself."""
    loss: Tensor
    nll: Tensor
    kl: Tensor


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _grouped(tensor: Tensor, shape, groups) -> Tensor:
    """``tensor`` (broadcastable to ``shape``) as a contiguous tensor with one dim per group of
    dims of ``shape``: size 1 where it is broadcast over the whole group, else the group's size."""
    tensor = tensor.reshape((1,) * (len(shape) - tensor.dim()) + tuple(tensor.shape))
    expanded, sizes, start = [], [], 0
    for count in groups:
        full, own = shape[start:start + count], tensor.shape[start:start + count]
        if all(n == 1 for n in own):
            expanded += own
            sizes.append(1)
        else:
            expanded += full
            sizes.append(math.prod(full))
        start += count
    return tensor.expand(expanded).reshape(sizes).contiguous()


def _needs_grad(tensor: Optional[Tensor]) -> bool:
    return tensor is not None and tensor.requires_grad and torch.is_grad_enabled()


def _latent_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _beta_tensor(beta, device, dtype) -> Tensor:
    if isinstance(beta, Tensor):
        return beta.to(device=device, dtype=dtype)
    return torch.full((), float(beta), dtype=dtype, device=device)  # a fill kernel, no copy


def _decoder_logvar(x_logvar, sigma, target_shape, name_target):
    """The decoder log-variance as a tensor (or None) and the constant used when it is None."""
    if x_logvar is not None and sigma is not None:
        raise ValueError("give either x_logvar or sigma, not both")
    if sigma is not None:
        check_sigma(sigma)
        if not isinstance(sigma, Tensor):
            return None, 2.0 * math.log(sigma)
        check_broadcasts_to("sigma", sigma, target_shape, name_target)
        return 2.0 * torch.log(sigma), 0.0
    if x_logvar is not None:
        check_float_tensor("x_logvar", x_logvar)
        check_broadcasts_to("x_logvar", x_logvar, target_shape, name_target)
    return x_logvar, 0.0


def _fused(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
           free_bits, bernoulli, reduction):
    """Normalise shapes and run the fused op. ``x_hat`` is ``[S, *x.shape]``, ``mu`` and
    ``logvar`` are ``[B, *latent]``, the priors broadcast to them. Returns the op's outputs."""
    batch, event = x.shape[0], tuple(x.shape[1:])
    n_samples = x_hat.shape[0]
    sample_shape = (n_samples, batch) + event
    groups = (1, 1, len(event))
    features = math.prod(event)
    x2 = x.reshape(batch, features).contiguous()
    x_hat3 = x_hat.reshape(n_samples, batch, features).contiguous()
    lv3 = None if x_logvar is None else _grouped(x_logvar, sample_shape, groups)

    dtype = _latent_dtype(mu, logvar, prior_mu, prior_logvar)
    latent_shape = tuple(mu.shape)
    latent_groups = (1, len(latent_shape) - 1)
    latents = math.prod(latent_shape[1:])
    mu2 = mu.to(dtype).reshape(batch, latents).contiguous()
    logvar2 = logvar.to(dtype).reshape(batch, latents).contiguous()
    priors = (None, None)
    if prior_mu is not None or prior_logvar is not None:
        zeros = mu.new_zeros((), dtype=dtype)
        grouped = [_grouped((p if p is not None else zeros).to(dtype), latent_shape, latent_groups)
                   for p in (prior_mu, prior_logvar)]
        rows = max(p.shape[0] for p in grouped)  # both per datapoint if either is
        priors = tuple(p.expand(rows, latents).contiguous() for p in grouped)

    inputs = (x2, x_hat3, lv3, mu2, logvar2) + priors
    originals = (x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar)
    # With reduction='none' a gradient can only be formed in forward for inputs with one row
    # per datapoint; the others are recomputed in backward with the upstream gradient.
    row_dims = (0, 1, 1, 0, 0, 0, 0)
    needs_grad = [_needs_grad(orig) and not (reduction == "none" and t.shape[dim] != batch)
                  for orig, t, dim in zip(originals, inputs, row_dims)]
    backend = _backends.resolve(x.device)
    loss_dtype = accumulation_dtype(x, x_hat, x_logvar, mu2)
    return _ops.elbo(x2, x_hat3, lv3, x_logvar_const, mu2, logvar2, priors[0], priors[1],
                     _beta_tensor(beta, x.device, loss_dtype), float(free_bits), bernoulli,
                     reduction, None, needs_grad, backend)


def _check_latents(mu, logvar, prior_mu, prior_logvar):
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    check_same_shape("mu", mu, "logvar", logvar)
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        check_float_tensor(name, prior, optional=True)
        if prior is not None:
            check_broadcasts_to(name, prior, mu.shape, "mu")


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def reparameterize(mu: Tensor, logvar: Tensor, n_samples: Optional[int] = None, *,
                   seed=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample ``z = mu + exp(½·logvar)·ε`` with ε from fastvae's noise stream (DESIGN.md §3).

    Args:
        mu, logvar: ``[..., d]``, the same shape; ``logvar`` is log σ².
        n_samples: None for one sample shaped like ``mu``; an int S ≥ 1 for ``[S, ..., d]``.
        seed: int in [0, 2**63) or 0-dim int64 tensor; the same seed gives the same ε on every
            backend and device. Default: drawn from ``generator``, else from the default
            generator of ``mu``'s device (so ``torch.manual_seed`` makes runs repeatable).
    Returns:
        z in the promoted dtype of ``mu`` and ``logvar``. ε is not stored: backward
        regenerates it from the seed.
    """
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    check_same_device(mu=mu, logvar=logvar, seed=seed)
    check_same_shape("mu", mu, "logvar", logvar)
    if n_samples is not None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int):
            raise TypeError(f"n_samples must be an int or None, got {type(n_samples).__name__}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if seed is not None:
        check_seed(seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

    if seed is None:
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=mu.device,
                             generator=generator)
    elif not isinstance(seed, Tensor):
        seed = torch.full((), seed, dtype=torch.int64, device=mu.device)
    dtype = _latent_dtype(mu, logvar)
    samples = 1 if n_samples is None else n_samples
    z = _ops.reparameterize(mu.to(dtype).reshape(-1).contiguous(),
                            logvar.to(dtype).reshape(-1).contiguous(), seed, samples,
                            _backends.resolve(mu.device))
    return z.view(mu.shape) if n_samples is None else z.view(n_samples, *mu.shape)


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Optional[Tensor] = None,
                prior_logvar: Optional[Tensor] = None) -> Tensor:
    """Analytic KL(N(mu, e^logvar) ‖ prior) in nats, summed over the last dim: ``[...]``.

    The prior is N(0, I) by default, else the diagonal Gaussian N(prior_mu, e^prior_logvar)
    (either may be omitted: 0); both broadcast to ``mu``'s shape ``[..., d]``."""
    _check_latents(mu, logvar, prior_mu, prior_logvar)
    check_same_device(mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    if mu.dim() == 0:
        raise ValueError("mu must have at least one dim (the latent dim), got a 0-dim tensor")
    lead = tuple(mu.shape[:-1])
    rows = math.prod(lead)
    groups = (len(lead), 1)
    priors = [None if p is None else _grouped(p, mu.shape, groups) for p in (prior_mu, prior_logvar)]
    empty = mu.new_empty(rows, 0)
    flat = (rows, mu.shape[-1])
    outputs = _fused(empty, empty.unsqueeze(0), None, 0.0, mu.reshape(flat), logvar.reshape(flat),
                     *priors, 1.0, 0.0, False, "none")
    return outputs[0].view(lead)


def _nll(x, x_hat, x_logvar, x_logvar_const, bernoulli, reduction):
    batch = x.shape[0]
    if x_hat.dim() == x.dim():
        x_hat = x_hat.unsqueeze(0)
    latent = x.new_empty(batch, 0)
    return _fused(x, x_hat, x_logvar, x_logvar_const, latent, latent, None, None, 1.0, 0.0,
                  bernoulli, reduction)[0]


def _check_data(x, x_hat, name_hat):
    check_float_tensor("x", x)
    check_float_tensor(name_hat, x_hat)
    if x.dim() < 1:
        raise ValueError("x must be [B, *event] with at least one dim, got a 0-dim tensor")
    if x_hat.shape != x.shape and x_hat.shape[1:] != x.shape:
        raise ValueError(f"{name_hat} must have x's shape {tuple(x.shape)} or [S, "
                         f"{', '.join(map(str, x.shape))}], got {tuple(x_hat.shape)}")


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Optional[Tensor] = None, *, sigma=None,
                 reduction: str = "none") -> Tensor:
    """Gaussian negative log-likelihood in nats, constants included.

    Args:
        x: ``[B, *event]``. mean: ``[B, *event]`` or ``[S, B, *event]`` (S samples).
        logvar / sigma: the decoder variance as log σ² or σ, broadcasting against ``mean``
            (scalar, ``[*event]``, ``[B, *event]`` or full); not both; neither means σ = 1.
        reduction: 'none' → ``[B]`` (NLL summed over event dims, averaged over samples);
            'mean' / 'sum' → mean / sum of that over B.
    """
    _check_data(x, mean, "mean")
    check_choice("reduction", reduction, REDUCTIONS)
    x_logvar, const = _decoder_logvar(logvar, sigma, mean.shape, "mean")
    check_same_device(x=x, mean=mean, logvar=x_logvar, sigma=sigma)
    return _nll(x, mean, x_logvar, const, False, reduction)


def bernoulli_nll(x: Tensor, logits: Tensor, *, reduction: str = "none") -> Tensor:
    """Bernoulli negative log-likelihood of ``x`` in [0, 1] given decoder ``logits``, in nats.

    Shapes and reductions as :func:`gaussian_nll`; computed as softplus(ℓ) − x·ℓ (stable)."""
    _check_data(x, logits, "logits")
    check_choice("reduction", reduction, REDUCTIONS)
    check_same_device(x=x, logits=logits)
    return _nll(x, logits, None, 0.0, True, reduction)


def elbo_loss(x: Tensor, x_hat: Tensor, mu: Tensor, logvar: Tensor, *,
              likelihood: str = "gaussian", x_logvar: Optional[Tensor] = None, sigma=None,
              beta=1.0, free_bits: float = 0.0, prior_mu: Optional[Tensor] = None,
              prior_logvar: Optional[Tensor] = None, reduction: str = "mean",
              return_terms: bool = False):
    """The negative ELBO, ``NLL + beta * KL``, in nats, fused in one pass.

    Args:
        x: data ``[B, *event]``.
        x_hat: decoder output (Gaussian mean or Bernoulli logits), ``[B, *event]`` or
            ``[S, B, *event]``; the NLL is averaged over the S samples.
        mu, logvar: the encoder's ``[B, *latent]``; the KL is summed over latent dims.
        likelihood: 'gaussian' or 'bernoulli'.
        x_logvar / sigma: Gaussian decoder variance (see :func:`gaussian_nll`).
        beta: float or 0-dim tensor weighting the KL (a tensor avoids recompiles).
        free_bits: λ ≥ 0 nats per latent dim: a dim whose batch-mean KL is below λ
            contributes the constant λ instead (no gradient).
        prior_mu, prior_logvar: a diagonal Gaussian prior broadcasting to ``mu`` (default N(0, I)).
        reduction: 'mean' over datapoints (nats per datapoint), 'sum', or 'none' → ``[B]``.
        return_terms: also return the detached ``nll`` and ``kl`` (analytic, before free bits).
    Returns:
        The loss (float32; float64 for float64 inputs), or :class:`ELBOTerms`.
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    check_choice("reduction", reduction, REDUCTIONS)
    _check_data(x, x_hat, "x_hat")
    _check_latents(mu, logvar, prior_mu, prior_logvar)
    if mu.dim() < 2 or mu.shape[0] != x.shape[0]:
        raise ValueError(f"mu must be [B, *latent] with B = {x.shape[0]} (x's first dim), got "
                         f"{tuple(mu.shape)}")
    check_beta(beta)
    check_real("free_bits", free_bits, minimum=0.0)
    bernoulli = likelihood == "bernoulli"
    if bernoulli and (x_logvar is not None or sigma is not None):
        raise ValueError("x_logvar and sigma belong to the Gaussian likelihood; "
                         "likelihood='bernoulli' takes neither")
    x_logvar, const = _decoder_logvar(x_logvar, sigma, x_hat.shape, "x_hat")
    check_same_device(x=x, x_hat=x_hat, mu=mu, logvar=logvar, x_logvar=x_logvar, sigma=sigma,
                      prior_mu=prior_mu, prior_logvar=prior_logvar)
    if x_hat.dim() == x.dim():
        x_hat = x_hat.unsqueeze(0)
    loss, nll, kl = _fused(x, x_hat, x_logvar, const, mu, logvar, prior_mu, prior_logvar, beta,
                           free_bits, bernoulli, reduction)[:3]
    if not return_terms:
        return loss
    return ELBOTerms(loss, reduce_rows(nll, reduction).detach(), reduce_rows(kl, reduction).detach())
