"""The independent oracle: the negative ELBO written with torch.distributions, differentiated
by autograd. Tests evaluate it in float64.

The keyword names are those of ``fastvae.elbo_loss``: the Gaussian decoder's scale is
``x_logvar`` (log σ²) or ``sigma``; the Laplace decoder's is ``x_logscale`` (log b) or ``scale``."""
import math

import torch
from torch import distributions as dist


def _as_tensor(value, like):
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=like.dtype,
                                                                      device=like.device)


def _decoder(likelihood, x_hat, x_logvar=None, sigma=None, x_logscale=None, scale=None):
    """The decoder distribution p(x | x̂), batch shape x̂'s."""
    if likelihood == "bernoulli":
        return dist.Bernoulli(logits=x_hat, validate_args=False)
    if likelihood == "continuous_bernoulli":
        return dist.ContinuousBernoulli(logits=x_hat, validate_args=False)
    if likelihood == "laplace":
        if x_logscale is not None:
            b = torch.exp(x_logscale)
        else:
            b = _as_tensor(1.0 if scale is None else scale, x_hat)
        return dist.Laplace(x_hat, b.expand(x_hat.shape))
    if x_logvar is not None:
        std = torch.exp(0.5 * x_logvar)
    else:
        std = _as_tensor(1.0 if sigma is None else sigma, x_hat)
    return dist.Normal(x_hat, std.expand(x_hat.shape))


def nll_rows(x, x_hat, likelihood="gaussian", x_logvar=None, sigma=None, x_logscale=None,
             scale=None):
    """[B]: NLL summed over event dims, averaged over the leading sample dim when present."""
    decoder = _decoder(likelihood, x_hat, x_logvar, sigma, x_logscale, scale)
    log_prob = decoder.log_prob(x.expand(x_hat.shape))
    per_sample = -log_prob.flatten(start_dim=log_prob.dim() - x.dim() + 1).sum(-1)
    return per_sample if x_hat.dim() == x.dim() else per_sample.mean(0)


def kl_elements(mu, logvar, prior_mu=None, prior_logvar=None):
    q = dist.Normal(mu, torch.exp(0.5 * logvar))
    p_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu.expand(mu.shape)
    p_scale = torch.ones_like(mu) if prior_logvar is None else torch.exp(0.5 * prior_logvar).expand(mu.shape)
    return dist.kl_divergence(q, dist.Normal(p_mu, p_scale))


def kl_rows(mu, logvar, prior_mu=None, prior_logvar=None):
    """[B]: the KL summed over every latent dim of ``[B, *latent]``."""
    return kl_elements(mu, logvar, prior_mu, prior_logvar).flatten(start_dim=1).sum(-1)


def kl_free_bits_rows(mu, logvar, prior_mu=None, prior_logvar=None, free_bits=0.0):
    """[B]: the KL after free bits. A latent dim whose batch-mean KL is below λ (strictly)
    contributes λ: at exactly λ it is active."""
    kl_el = kl_elements(mu, logvar, prior_mu, prior_logvar).flatten(start_dim=1)
    if free_bits <= 0:
        return kl_el.sum(-1)
    active = kl_el.mean(0) >= free_bits
    return torch.where(active, kl_el, torch.full_like(kl_el, free_bits)).sum(-1)


def reduce(rows, reduction):
    return {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]


def elbo_loss(x, x_hat, mu, logvar, likelihood="gaussian", x_logvar=None, sigma=None,
              x_logscale=None, scale=None, beta=1.0, free_bits=0.0, prior_mu=None,
              prior_logvar=None, reduction="mean", capacity=None):
    """(loss, nll, kl) reduced alike; kl is the analytic KL before free bits. With a capacity C
    the KL term of each datapoint is |KL_fb − C| (before the reduction)."""
    nll = nll_rows(x, x_hat, likelihood, x_logvar, sigma, x_logscale, scale)
    kl = kl_rows(mu, logvar, prior_mu, prior_logvar)
    kl_term = kl_free_bits_rows(mu, logvar, prior_mu, prior_logvar, free_bits)
    if capacity is not None:
        kl_term = (kl_term - capacity).abs()
    loss = nll + beta * kl_term
    return reduce(loss, reduction), reduce(nll, reduction), reduce(kl, reduction)


def log_weights(x, x_hat, z, mu, logvar, likelihood="gaussian", x_logvar=None, sigma=None,
                x_logscale=None, scale=None, prior_mu=None, prior_logvar=None):
    """[S, B]: log p(x|z_s) + log p(z_s) − log q(z_s|x) with torch.distributions."""
    decoder = _decoder(likelihood, x_hat, x_logvar, sigma, x_logscale, scale)
    log_px = decoder.log_prob(x.expand(x_hat.shape)).flatten(start_dim=2).sum(-1)
    p_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu.expand(mu.shape)
    p_std = (torch.ones_like(mu) if prior_logvar is None
             else torch.exp(0.5 * prior_logvar).expand(mu.shape))
    log_pz = dist.Normal(p_mu, p_std).log_prob(z).flatten(start_dim=2).sum(-1)
    log_qz = dist.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).flatten(start_dim=2).sum(-1)
    return log_px + log_pz - log_qz


def iwae_loss(x, x_hat, z, mu, logvar, reduction="mean", **options):
    """The negative importance-weighted bound, log S − logsumexp_s log w_s, reduced."""
    weights = log_weights(x, x_hat, z, mu, logvar, **options)
    return reduce(math.log(weights.shape[0]) - torch.logsumexp(weights, 0), reduction)
