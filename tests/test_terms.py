"""gaussian_kl, gaussian_nll, laplace_nll and bernoulli_nll against torch.distributions, on every
backend."""
import math

import pytest
import torch

import fastvae
import oracle
from cases import TEST_DEVICE

F64 = torch.float64


def leaf(*shape, scale=1.0):
    return (torch.randn(shape, dtype=F64, device=TEST_DEVICE) * scale).requires_grad_()


def check_values_and_grads(got, want, inputs):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, inputs, upstream)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prior", [None, "shared", "datapoint", "logvar_only", "channel"])
@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 5), (2, 4, 8, 8)])
def test_gaussian_kl(backend, shape, prior):
    """``[B, *latent] → [B]``: the KL summed over every latent dim."""
    mu, logvar = leaf(*shape), leaf(*shape, scale=0.5)
    latent = shape[1:]
    priors = {}
    if prior == "shared":
        priors = {"prior_mu": leaf(*latent), "prior_logvar": leaf(*latent, scale=0.5)}
    elif prior == "datapoint":
        priors = {"prior_mu": leaf(*shape), "prior_logvar": leaf(*shape, scale=0.5)}
    elif prior == "logvar_only":
        priors = {"prior_logvar": leaf(1, *latent, scale=0.5)}
    elif prior == "channel":
        priors = {"prior_mu": leaf(latent[0], *[1] * (len(latent) - 1), scale=0.5)}
    got = fastvae.gaussian_kl(mu, logvar, **priors)
    assert got.shape == shape[:1]
    want = oracle.kl_rows(mu, logvar, priors.get("prior_mu"), priors.get("prior_logvar"))
    check_values_and_grads(got, want, [mu, logvar, *priors.values()])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("variance", [None, "sigma", "scalar", "event", "datapoint", "full"])
@pytest.mark.parametrize("samples", [None, 2])
def test_gaussian_nll(backend, variance, samples, reduction):
    x = leaf(4, 3, 5)
    mean = leaf(*(((samples,) if samples else ()) + (4, 3, 5)))
    shapes = {"scalar": (), "event": (3, 5), "datapoint": (4, 3, 5), "full": mean.shape}
    kwargs, inputs = {}, [x, mean]
    if variance == "sigma":
        kwargs["sigma"] = 1.7
    elif variance is not None:
        kwargs["logvar"] = leaf(*shapes[variance], scale=0.5)
        inputs.append(kwargs["logvar"])
    got = fastvae.gaussian_nll(x, mean, reduction=reduction, **kwargs)
    rows = oracle.nll_rows(x, mean, "gaussian", kwargs.get("logvar"), kwargs.get("sigma"))
    check_values_and_grads(got, oracle.reduce(rows, reduction), inputs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("scale", [None, "float", "tensor", "scalar", "event", "datapoint", "full"])
@pytest.mark.parametrize("samples", [None, 2])
def test_laplace_nll(backend, scale, samples, reduction):
    x = leaf(4, 3, 5)
    loc = leaf(*(((samples,) if samples else ()) + (4, 3, 5)))
    shapes = {"scalar": (), "event": (3, 5), "datapoint": (4, 3, 5), "full": loc.shape}
    kwargs, inputs = {}, [x, loc]
    if scale == "float":
        kwargs["scale"] = 0.6
    elif scale == "tensor":
        kwargs["scale"] = (torch.rand(3, 5, dtype=F64, device=TEST_DEVICE) + 0.5).requires_grad_()
        inputs.append(kwargs["scale"])
    elif scale is not None:
        kwargs["log_scale"] = leaf(*shapes[scale], scale=0.5)
        inputs.append(kwargs["log_scale"])
    got = fastvae.laplace_nll(x, loc, reduction=reduction, **kwargs)
    rows = oracle.nll_rows(x, loc, "laplace", x_logscale=kwargs.get("log_scale"),
                           scale=kwargs.get("scale"))
    check_values_and_grads(got, oracle.reduce(rows, reduction), inputs)


def test_laplace_gradient_at_zero_residual_is_zero(backend):
    """sign(0) = 0: where x equals the location, ∂x = ∂loc = 0 and ∂θ = 1 (per element)."""
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64, requires_grad=True)
    loc = torch.tensor([[0.5, 0.0, 2.0]], dtype=F64, requires_grad=True)
    log_scale = torch.zeros(3, dtype=F64, requires_grad=True)
    nll = fastvae.laplace_nll(x, loc, log_scale)
    torch.testing.assert_close(nll, torch.tensor([1.0 + 3 * math.log(2.0)], dtype=F64))
    gx, gloc, gtheta = torch.autograd.grad(nll.sum(), (x, loc, log_scale))
    torch.testing.assert_close(gx, torch.tensor([[0.0, -1.0, 0.0]], dtype=F64))
    torch.testing.assert_close(gloc, torch.tensor([[0.0, 1.0, 0.0]], dtype=F64))
    torch.testing.assert_close(gtheta, torch.tensor([1.0, 0.0, 1.0], dtype=F64))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("samples", [None, 3])
def test_bernoulli_nll(backend, samples, reduction):
    x = torch.rand(5, 7, dtype=F64, device=TEST_DEVICE, requires_grad=True)
    logits = leaf(*(((samples,) if samples else ()) + (5, 7)), scale=3.0)
    got = fastvae.bernoulli_nll(x, logits, reduction=reduction)
    want = oracle.reduce(oracle.nll_rows(x, logits, "bernoulli"), reduction)
    check_values_and_grads(got, want, [x, logits])


def test_bernoulli_extreme_logits_are_stable(backend):
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    logits = torch.tensor([[-200.0, 200.0, -200.0, 200.0]], requires_grad=True)
    got = fastvae.bernoulli_nll(x, logits)
    torch.testing.assert_close(got, torch.tensor([400.0]))
    got.backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.0, 0.0, -1.0, 1.0]]))


def test_kl_gradcheck(backend):
    mu, logvar = leaf(3, 4), leaf(3, 4, scale=0.5)
    prior_mu, prior_logvar = leaf(4), leaf(4, scale=0.5)
    assert torch.autograd.gradcheck(fastvae.gaussian_kl, (mu, logvar, prior_mu, prior_logvar),
                                    fast_mode=True)
