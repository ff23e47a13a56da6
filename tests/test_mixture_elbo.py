"""elbo_loss with a mixture-of-Gaussians prior (the KL estimated from the sample), on every
backend, against torch.distributions.MixtureSameFamily in float64: values and the gradients of
every input, with β a tensor, a capacity and every reduction; and the argument errors."""
import pytest
import torch
from torch import distributions as dist

import fastvae
import oracle
from cases import TEST_DEVICE, generator

F64 = torch.float64


def _inputs(samples=None, components=4, seed=0):
    g = generator(seed)

    def leaf(*shape):
        return torch.randn(shape, generator=g, dtype=F64, device=TEST_DEVICE).requires_grad_()

    batch, latent = 5, (2, 3)
    x = torch.rand(batch, 7, generator=g, dtype=F64, device=TEST_DEVICE)
    x_hat = leaf(*(() if samples is None else (samples,)), batch, 7)
    mu, logvar = leaf(batch, *latent), leaf(batch, *latent)
    z_shape = (batch, *latent) if samples is None else (samples, batch, *latent)
    z = (mu.detach() + torch.randn(z_shape, generator=g, dtype=F64, device=TEST_DEVICE)
         ).requires_grad_()
    prior = fastvae.GaussianMixture(leaf(components, *latent), leaf(components, *latent),
                                    leaf(components))
    return x, x_hat, z, mu, logvar, prior


def _oracle(x, x_hat, z, mu, logvar, prior, beta, capacity, reduction):
    mixture = dist.MixtureSameFamily(
        dist.Categorical(logits=prior.logits),
        dist.Independent(dist.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 2))
    posterior = dist.Independent(dist.Normal(mu, torch.exp(0.5 * logvar)), 2)
    kl = posterior.log_prob(z) - mixture.log_prob(z)
    kl = kl.mean(0) if z.dim() > mu.dim() else kl
    nll = oracle.nll_rows(x, x_hat, "bernoulli")
    term = kl if capacity is None else (kl - capacity).abs()
    return oracle.reduce(nll + beta * term, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("samples, capacity", [(None, None), (3, None), (None, 4.0), (2, 40.0)])
def test_matches_distributions_float64(backend, samples, capacity, reduction):
    x, x_hat, z, mu, logvar, prior = _inputs(samples)
    beta = torch.tensor(0.7, dtype=F64, device=TEST_DEVICE, requires_grad=True)
    leaves = [x_hat, z, mu, logvar, *prior, beta]
    upstream = torch.randn((5,) if reduction == "none" else (), generator=generator(1), dtype=F64,
                           device=TEST_DEVICE)
    got = fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="bernoulli", prior=prior, z=z,
                            beta=beta, capacity=capacity, reduction=reduction)
    want = _oracle(x, x_hat, z, mu, logvar, prior, beta, capacity, reduction)
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    for g, w in zip(torch.autograd.grad(got, leaves, upstream),
                    torch.autograd.grad(want, leaves, upstream)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_return_terms(backend):
    x, x_hat, z, mu, logvar, prior = _inputs()
    terms = fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="bernoulli", prior=prior, z=z,
                              beta=0.5, return_terms=True)
    torch.testing.assert_close(terms.kl, fastvae.mixture_kl(z, mu, logvar, prior).mean().detach())
    torch.testing.assert_close(terms.loss.detach(), terms.nll + 0.5 * terms.kl)


@pytest.mark.parametrize("change, match", [
    (dict(z=None), "needs the sample z"),
    (dict(free_bits=0.1), "free_bits applies per latent dim"),
    (dict(prior_mu="zeros"), "either a Gaussian prior"),
    (dict(prior="no mixture"), "GaussianMixture"),
    (dict(components=0), r"K >= 1"),
    (dict(without_prior=True), "z is only used with a mixture prior"),
])
def test_bad_arguments_raise(backend, change, match):
    x, x_hat, z, mu, logvar, prior = _inputs(components=change.get("components", 4))
    options = {"likelihood": "bernoulli", "prior": prior, "z": z}
    options.update({k: v for k, v in change.items() if k in ("z", "free_bits", "prior")})
    if change.get("prior_mu") == "zeros":
        options["prior_mu"] = torch.zeros_like(mu)
    if change.get("without_prior"):
        options.pop("prior")
    with pytest.raises((ValueError, TypeError), match=match):
        fastvae.elbo_loss(x, x_hat, mu, logvar, **options)


@pytest.mark.parametrize("mixture", [False, True])
def test_categorical_likelihood_with_capacity_and_either_prior(backend, mixture):
    """The categorical NLL composes with a capacity and with a Gaussian or mixture prior."""
    _, _, z, mu, logvar, prior = _inputs(seed=3)
    g = generator(4)
    target = torch.randint(0, 6, (5, 7), generator=g, device=TEST_DEVICE)
    logits = torch.randn(5, 6, 7, generator=g, dtype=F64, device=TEST_DEVICE).requires_grad_()
    options = {"prior": prior, "z": z} if mixture else {}
    got = fastvae.elbo_loss(target, logits, mu, logvar, likelihood="categorical", class_dim=1,
                            beta=0.5, capacity=2.0, **options)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="none").sum(-1)
    if mixture:
        mix = dist.MixtureSameFamily(dist.Categorical(logits=prior.logits), dist.Independent(
            dist.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 2))
        kl = dist.Independent(dist.Normal(mu, torch.exp(0.5 * logvar)), 2).log_prob(z) \
            - mix.log_prob(z)
    else:
        kl = oracle.kl_rows(mu, logvar)
    want = (nll + 0.5 * (kl - 2.0).abs()).mean()
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    leaves = [logits, mu, logvar] + ([z, *prior] if mixture else [])
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
