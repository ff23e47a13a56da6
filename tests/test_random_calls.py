"""Random calls of elbo_loss and iwae_loss against the oracle, in float64.

The shared cases (cases.py) take each option on its own or in a fixed product; here every call
draws all of them at once, from a fixed seed per test: batch sizes 0 to 5, events and latents
of one to three dims, a sample dim or none, every likelihood, the decoder scale and the priors
as tensors of random broadcast shapes (or as floats), β and the capacity as floats or tensors,
free bits, every reduction, inputs laid out transposed, and which of them require grad. Each
call is checked on its value, its gradients for a random upstream gradient, and those of a
second backward through the retained graph with another upstream gradient (the path that
rescales the gradients handed out first).
"""
import random

import pytest
import torch

import fastvae
import oracle
from cases import (LIKELIHOODS, LOG_SCALE_KEYWORD, ON_CUDA, SCALE_KEYWORD, UNIT_INTERVAL,
                   generator)

# Fewer on a GPU, where each new Triton specialisation compiles for seconds.
CALLS = 30 if ON_CUDA else 100
REDUCTIONS = ("none", "mean", "sum")


class _Draw:
    """Random choices and float64 tensors from one seed. Every tensor requires grad with
    probability ``grad``; some are laid out transposed in memory."""

    def __init__(self, seed, grad=0.8):
        self.choice = random.Random(seed)
        self.tensors = generator(seed)
        self.grad = grad

    def shape(self, dims, sizes=(1, 2, 3, 5)):
        return tuple(self.choice.choice(sizes) for _ in range(dims))

    def broadcast_shape(self, shape):
        """A shape that broadcasts to ``shape``: leading dims dropped, others set to 1."""
        kept = shape[len(shape) - self.choice.randint(0, len(shape)):]
        return tuple(size if self.choice.random() < 0.6 else 1 for size in kept)

    def tensor(self, shape, scale=1.0, shift=0.0, uniform=False, positive=False):
        """Normal values (times ``scale``, plus ``shift``); uniform in [0, 1); or with
        ``positive`` the exponential of the normal ones."""
        values = (torch.rand(shape, generator=self.tensors, dtype=torch.float64) if uniform else
                  torch.randn(shape, generator=self.tensors, dtype=torch.float64) * scale + shift)
        if positive:
            values = values.exp()
        if values.dim() >= 2 and self.choice.random() < 0.3:  # the same values, strided
            values = values.transpose(0, -1).contiguous().transpose(0, -1)
        return values.requires_grad_(self.choice.random() < self.grad)

    def maybe(self, probability, make):
        return make() if self.choice.random() < probability else None


def _decoder_scale(draw, likelihood, hat_shape):
    """elbo_loss's keyword of the decoder scale: θ, the scale as a tensor, a float or none."""
    if likelihood not in LOG_SCALE_KEYWORD:
        return {}
    form = draw.choice.choice(("none", "float", "tensor", "log"))
    if form == "float":
        return {SCALE_KEYWORD[likelihood]: draw.choice.uniform(0.3, 2.0)}
    shape = draw.broadcast_shape(hat_shape)
    if form == "tensor":
        return {SCALE_KEYWORD[likelihood]: draw.tensor(shape, 0.3, positive=True)}
    return {LOG_SCALE_KEYWORD[likelihood]: draw.tensor(shape, 0.5)} if form == "log" else {}


def _data(draw, samples):
    """(x, x_hat, mu, logvar, keywords) of a random call, the keywords the likelihood's."""
    batch = draw.choice.choice((0, 1, 2, 3, 5))
    data_shape = (batch, *draw.shape(draw.choice.randint(1, 3)))
    hat_shape = data_shape if samples is None else (samples, *data_shape)
    latent_shape = (batch, *draw.shape(draw.choice.randint(1, 2)))
    likelihood = draw.choice.choice(LIKELIHOODS)
    x = draw.tensor(data_shape, uniform=likelihood in UNIT_INTERVAL)
    x_hat, mu, logvar = draw.tensor(hat_shape), draw.tensor(latent_shape), draw.tensor(
        latent_shape, 0.5)
    keywords = {"likelihood": likelihood, **_decoder_scale(draw, likelihood, hat_shape)}
    for name, scale in (("prior_mu", 1.0), ("prior_logvar", 0.3)):
        prior = draw.maybe(0.4, lambda: draw.tensor(draw.broadcast_shape(latent_shape), scale))
        if prior is not None:
            keywords[name] = prior
    keywords["reduction"] = draw.choice.choice(REDUCTIONS)
    return x, x_hat, mu, logvar, keywords


def _elbo_call(seed):
    draw = _Draw(seed)
    x, x_hat, mu, logvar, keywords = _data(draw, draw.choice.choice((None, 1, 3)))
    beta = draw.choice.choice(("default", "float", "tensor"))
    if beta != "default":
        value = draw.choice.uniform(0.0, 2.0)
        keywords["beta"] = value if beta == "float" else torch.tensor(
            value, dtype=torch.float64).requires_grad_(draw.choice.random() < draw.grad)
    if draw.choice.random() < 0.3:
        keywords["free_bits"] = draw.choice.uniform(0.0, 1.0)
    if draw.choice.random() < 0.3:
        capacity = draw.choice.uniform(0.0, 3.0)
        keywords["capacity"] = capacity if draw.choice.random() < 0.5 else torch.tensor(
            capacity, dtype=torch.float64)
    return (x, x_hat, mu, logvar), keywords


def _iwae_call(seed):
    draw = _Draw(seed)
    x, x_hat, mu, logvar, keywords = _data(draw, draw.choice.choice((1, 2, 4)))
    z = draw.tensor((x_hat.shape[0], *mu.shape))
    return (x, x_hat, z, mu, logvar), keywords


def _described(args, keywords):
    shapes = [tuple(t.shape) for t in args]
    options = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else v
               for k, v in keywords.items()}
    return f"inputs {shapes}, options {options}"


def _check(fastvae_loss, oracle_loss, args, keywords):
    """Value, gradients and a retained graph's second gradients against the oracle's."""
    got, want = fastvae_loss(*args, **keywords), oracle_loss(*args, **keywords)
    what = _described(args, keywords)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, equal_nan=True,  # a mean of B = 0
                               msg=lambda m: f"{what}: {m}")
    leaves = [t for t in (*args, *keywords.values())
              if isinstance(t, torch.Tensor) and t.requires_grad]
    if not leaves:
        return
    for seed in (1, 2):  # the second backward goes through the graph the first one retained
        upstream = torch.randn(got.shape, generator=generator(seed), dtype=torch.float64)
        grads = torch.autograd.grad(got, leaves, upstream, retain_graph=True, allow_unused=True)
        wants = torch.autograd.grad(want, leaves, upstream, retain_graph=True, allow_unused=True)
        for index, (grad, expected) in enumerate(zip(grads, wants)):
            expected = torch.zeros_like(leaves[index]) if expected is None else expected
            grad = torch.zeros_like(leaves[index]) if grad is None else grad
            torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-10, equal_nan=True, msg=lambda m: (
                f"{what}: backward {seed}, gradient of input {index}: {m}"))


def _oracle_elbo(*args, **keywords):
    return oracle.elbo_loss(*args, **keywords)[0]


@pytest.mark.parametrize("seed", range(CALLS))
def test_elbo_loss(backend, seed):
    args, keywords = _elbo_call(seed)
    _check(fastvae.elbo_loss, _oracle_elbo, args, keywords)


@pytest.mark.parametrize("seed", range(CALLS))
def test_iwae_loss(backend, seed):
    args, keywords = _iwae_call(seed)
    _check(fastvae.iwae_loss, oracle.iwae_loss, args, keywords)
