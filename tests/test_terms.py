"""gaussian_kl, gaussian_nll and bernoulli_nll against torch.distributions, on every backend."""
import pytest
import torch

import fastvae
import oracle

F64 = torch.float64


def leaf(*shape, scale=1.0):
    return (torch.randn(shape, dtype=F64) * scale).requires_grad_()


def check_values_and_grads(got, want, inputs):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(want)
    grads = torch.autograd.grad(got, inputs, upstream)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prior", [None, "shared", "datapoint", "logvar_only"])
@pytest.mark.parametrize("shape", [(6,), (4, 6), (2, 3, 5)])
def test_gaussian_kl(backend, shape, prior):
    mu, logvar = leaf(*shape), leaf(*shape, scale=0.5)
    priors = {}
    if prior == "shared":
        priors = {"prior_mu": leaf(shape[-1]), "prior_logvar": leaf(shape[-1], scale=0.5)}
    elif prior == "datapoint":
        priors = {"prior_mu": leaf(*shape), "prior_logvar": leaf(*shape, scale=0.5)}
    elif prior == "logvar_only":
        priors = {"prior_logvar": leaf(1, shape[-1], scale=0.5) if len(shape) > 1 else leaf(shape[-1])}
    got = fastvae.gaussian_kl(mu, logvar, **priors)
    assert got.shape == shape[:-1]
    want = oracle.kl_elements(mu, logvar, priors.get("prior_mu"), priors.get("prior_logvar")).sum(-1)
    check_values_and_grads(got, want, [mu, logvar, *priors.values()])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("variance", [None, "sigma", "scalar", "event", "datapoint", "full"])
@pytest.mark.parametrize("samples", [None, 2])
def test_gaussian_nll(backend, variance, samples, reduction):
    x = torch.randn(4, 3, 5, dtype=F64, requires_grad=True)
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
@pytest.mark.parametrize("samples", [None, 3])
def test_bernoulli_nll(backend, samples, reduction):
    x = torch.rand(5, 7, dtype=F64, requires_grad=True)
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
