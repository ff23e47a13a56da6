"""The independent oracle: the negative ELBO written with torch.distributions, differentiated
by autograd. Tests evaluate it in float64."""
import torch
from torch import distributions as dist


def nll_rows(x, x_hat, likelihood="gaussian", x_logvar=None, sigma=None):
    """[B]: NLL summed over event dims, averaged over the leading sample dim when present."""
    if likelihood == "bernoulli":
        log_prob = dist.Bernoulli(logits=x_hat, validate_args=False).log_prob(x)
    else:
        if x_logvar is not None:
            scale = torch.exp(0.5 * x_logvar)
        elif sigma is not None:
            scale = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(sigma, dtype=x.dtype)
        else:
            scale = torch.ones((), dtype=x.dtype)
        log_prob = dist.Normal(x_hat, scale.expand(x_hat.shape)).log_prob(x.expand(x_hat.shape))
    per_sample = -log_prob.flatten(start_dim=log_prob.dim() - x.dim() + 1).sum(-1)
    return per_sample if x_hat.dim() == x.dim() else per_sample.mean(0)


def kl_elements(mu, logvar, prior_mu=None, prior_logvar=None):
    q = dist.Normal(mu, torch.exp(0.5 * logvar))
    p_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu.expand(mu.shape)
    p_scale = torch.ones_like(mu) if prior_logvar is None else torch.exp(0.5 * prior_logvar).expand(mu.shape)
    return dist.kl_divergence(q, dist.Normal(p_mu, p_scale))


def reduce(rows, reduction):
    return {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]


def elbo_loss(x, x_hat, mu, logvar, likelihood="gaussian", x_logvar=None, sigma=None, beta=1.0,
              free_bits=0.0, prior_mu=None, prior_logvar=None, reduction="mean"):
    """(loss, nll, kl) reduced alike; kl is the analytic KL before free bits."""
    nll = nll_rows(x, x_hat, likelihood, x_logvar, sigma)
    kl_el = kl_elements(mu, logvar, prior_mu, prior_logvar).flatten(start_dim=1)
    kl = kl_el.sum(-1)
    kl_term = kl
    if free_bits > 0:
        active = kl_el.mean(0) >= free_bits
        kl_term = torch.where(active, kl_el, torch.full_like(kl_el, free_bits)).sum(-1)
    loss = nll + beta * kl_term
    return reduce(loss, reduction), reduce(nll, reduction), reduce(kl, reduction)
