"""The implementations compared: every fastvae backend that runs on the device, and the same
loss in plain PyTorch, with torch.distributions, and plain PyTorch under torch.compile.

Each comes as a sampler ``(mu, logvar) -> z`` and a loss ``(x, x_hat, x_logvar, sigma,
likelihood, mu, logvar) -> −ELBO`` averaged over the batch (nats per datapoint, float32); the
kernel benchmark runs one or both (``workload``) on the inputs of ``workloads.make_inputs``.
"""
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal, kl_divergence

import fastvae

LOG_2PI = math.log(2 * math.pi)


def plain_sample(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def plain_loss(x, x_hat, x_logvar, sigma, likelihood, mu, logvar):
    """The loss as a PyTorch user would write it, in the inputs' dtype."""
    if likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(x_hat, x, reduction="none")
    elif x_logvar is not None:
        nll = 0.5 * ((x - x_hat) ** 2 * torch.exp(-x_logvar) + x_logvar + LOG_2PI)
    else:
        nll = 0.5 * (x - x_hat) ** 2 / sigma ** 2 + (math.log(sigma) + 0.5 * LOG_2PI)
    kl = 0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar)
    return (nll.sum(-1) + kl.sum(-1)).mean().float()


def distributions_sample(mu, logvar):
    return Normal(mu, torch.exp(0.5 * logvar)).rsample()


def distributions_loss(x, x_hat, x_logvar, sigma, likelihood, mu, logvar):
    """The same loss with torch.distributions (default argument validation)."""
    if likelihood == "bernoulli":
        decoder = Bernoulli(logits=x_hat)
    else:
        decoder = Normal(x_hat, torch.exp(0.5 * x_logvar) if x_logvar is not None else sigma)
    posterior = Normal(mu, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    nll = -decoder.log_prob(x).sum(-1)
    kl = kl_divergence(posterior, prior).sum(-1)
    return (nll + kl).mean().float()


def fastvae_sample(backend):
    def sample(mu, logvar):
        with fastvae.use_backend(backend):
            return fastvae.reparameterize(mu, logvar)
    return sample


def fastvae_elbo(x, x_hat, x_logvar, sigma, likelihood, mu, logvar):
    """fastvae.elbo_loss with the baselines' argument order, on the current backend."""
    return fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood=likelihood, x_logvar=x_logvar,
                             sigma=sigma)


def fastvae_loss(backend):
    def loss(*args):
        with fastvae.use_backend(backend):
            return fastvae_elbo(*args)
    return loss


def workload(sample, loss, part):
    """``(loss, z)`` of one step of ``part`` (see workloads.PARTS): z is None for 'elbo', the
    loss None for 'sample'. The decoder is left out, so x_hat does not depend on z."""
    def step(x, x_hat, x_logvar, sigma, likelihood, mu, logvar):
        value = (None if part == "sample"
                 else loss(x, x_hat, x_logvar, sigma, likelihood, mu, logvar))
        return value, (None if part == "elbo" else sample(mu, logvar))
    return step


@dataclass
class Implementation:
    name: str
    fn: Callable
    compiled: bool = False   # needs a fresh compile per case (see reset)
    # B×D tensors alive at the peak, inputs and gradients included: a generous estimate
    # used only to skip cases that would not fit in memory.
    peak_batch_by_event_tensors: int = 16
    capturable: bool = True  # no host sync, so a CUDA graph can capture its step

    def reset(self):
        """Forget compiled graphs so each case is compiled for its own static shapes, as a
        training run with a fixed batch size would be (and no cache limit is ever hit)."""
        if self.compiled:
            torch._dynamo.reset()

    def __call__(self, inputs):
        return self.fn(inputs["x"], inputs["x_hat"], inputs["x_logvar"], inputs["sigma"],
                       inputs["likelihood"], inputs["mu"], inputs["logvar"])


def fastvae_backends(device):
    """fastvae's backends that can run on ``device``, but Triton only on CUDA: its CPU
    interpreter is a test tool, far too slow to time."""
    device = torch.device(device)
    return [name for name in fastvae.available_backends(device)
            if name != "triton" or device.type == "cuda"]


def all_implementations(device, part="both"):
    """Every implementation of ``part`` that runs on ``device``, fastvae's backends first."""
    implementations = [Implementation(f"fastvae-{name}",
                                      workload(fastvae_sample(name), fastvae_loss(name), part),
                                      peak_batch_by_event_tensors=8 if name != "reference" else 16)
                       for name in fastvae_backends(device)]
    implementations += [
        Implementation("plain", workload(plain_sample, plain_loss, part),
                       peak_batch_by_event_tensors=14),
        # Argument validation reads values back to the host: no CUDA-graph capture.
        Implementation("distributions", workload(distributions_sample, distributions_loss, part),
                       peak_batch_by_event_tensors=18, capturable=False),
        Implementation("compiled-plain", torch.compile(workload(plain_sample, plain_loss, part)),
                       compiled=True, peak_batch_by_event_tensors=10),
    ]
    return implementations
