"""The shared cases: inputs for every option of ``elbo_loss``, built in any dtype."""
import os
from dataclasses import dataclass
from typing import Optional

import torch

# The device every shared case runs on: ``FASTVAE_TEST_DEVICE=cuda`` runs the suite on a GPU.
TEST_DEVICE = torch.device(os.environ.get("FASTVAE_TEST_DEVICE", "cpu"))


def generator(seed: int) -> torch.Generator:
    """A generator on the test device, seeded."""
    return torch.Generator(TEST_DEVICE).manual_seed(seed)

BATCH, EVENT, LATENT = 5, (2, 3, 2), (3,)
SAMPLES = 3


@dataclass(frozen=True)
class Case:
    name: str
    likelihood: str = "gaussian"
    decoder_var: Optional[str] = None  # None | sigma | sigma_tensor | scalar | event | channel | datapoint | full
    samples: Optional[int] = None
    prior: Optional[str] = None        # None | shared | datapoint | mu_only
    free_bits: float = 0.0
    beta: object = 1.0                 # float, or "tensor" for a 0-dim tensor requiring grad
    batch: int = BATCH
    event: tuple = EVENT
    latent: tuple = LATENT
    x_requires_grad: bool = True

    def __str__(self):
        return self.name


CASES = [
    Case("unit_sigma"),
    Case("sigma_float", decoder_var="sigma"),
    Case("sigma_tensor", decoder_var="sigma_tensor"),
    Case("logvar_scalar", decoder_var="scalar"),
    Case("logvar_event", decoder_var="event"),
    Case("logvar_channel", decoder_var="channel"),
    Case("logvar_datapoint", decoder_var="datapoint"),
    Case("logvar_full", decoder_var="full"),
    Case("samples_full", decoder_var="full", samples=SAMPLES),
    Case("samples_datapoint", decoder_var="datapoint", samples=SAMPLES),
    Case("samples_event", decoder_var="event", samples=SAMPLES),
    Case("bernoulli", likelihood="bernoulli"),
    Case("bernoulli_samples", likelihood="bernoulli", samples=SAMPLES),
    Case("prior_shared", prior="shared", decoder_var="full"),
    Case("prior_datapoint", prior="datapoint"),
    Case("prior_mu_only", prior="mu_only"),
    Case("free_bits", free_bits=0.6, decoder_var="full"),
    Case("free_bits_prior", free_bits=0.6, prior="shared"),
    Case("beta_tensor", beta="tensor", decoder_var="event"),
    Case("beta_float", beta=0.25, likelihood="bernoulli"),
    Case("batch_one", batch=1, decoder_var="event", prior="shared"),
    Case("flat_event", event=(7,), latent=(4,), decoder_var="datapoint"),
    Case("latent_2d", latent=(2, 3), prior="shared"),
]


def build(case: Case, dtype=torch.float64, latent_dtype=None, generator=None):
    """(positional args, keyword args) for ``elbo_loss``; every floating tensor requires grad."""
    latent_dtype = latent_dtype or dtype
    g = generator

    def leaf(shape, scale=1.0, shift=0.0, dt=dtype):
        t = torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(dt).requires_grad_()

    data_shape = (case.batch,) + case.event
    hat_shape = data_shape if case.samples is None else (case.samples,) + data_shape
    if case.likelihood == "bernoulli":
        x = torch.rand(data_shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        x = torch.randn(data_shape, generator=g, dtype=torch.float64).to(dtype)
    x.requires_grad_(case.x_requires_grad)
    x_hat = leaf(hat_shape)
    latent_shape = (case.batch,) + case.latent
    mu = leaf(latent_shape)
    logvar = leaf(latent_shape, scale=0.5)
    kwargs = {"likelihood": case.likelihood}
    var_shapes = {"scalar": (), "event": case.event, "channel": (case.event[0],) + (1,) * (len(case.event) - 1),
                  "datapoint": data_shape, "full": hat_shape}
    if case.decoder_var == "sigma":
        kwargs["sigma"] = 0.7
    elif case.decoder_var == "sigma_tensor":
        kwargs["sigma"] = (torch.rand(case.event, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    elif case.decoder_var is not None:
        kwargs["x_logvar"] = leaf(var_shapes[case.decoder_var], scale=0.5)
    if case.prior == "shared":
        kwargs["prior_mu"] = leaf(case.latent, scale=0.5, dt=latent_dtype)
        kwargs["prior_logvar"] = leaf(case.latent, scale=0.5, dt=latent_dtype)
    elif case.prior == "datapoint":
        kwargs["prior_mu"] = leaf(latent_shape, scale=0.5, dt=latent_dtype)
        kwargs["prior_logvar"] = leaf(latent_shape, scale=0.5, dt=latent_dtype)
    elif case.prior == "mu_only":
        kwargs["prior_mu"] = leaf(case.latent, scale=0.5, dt=latent_dtype)
    if case.free_bits:
        kwargs["free_bits"] = case.free_bits
    if case.beta == "tensor":
        kwargs["beta"] = torch.tensor(0.7, dtype=torch.float64).requires_grad_()
    elif case.beta != 1.0:
        kwargs["beta"] = case.beta
    return [x, x_hat, mu.to(latent_dtype).detach().requires_grad_(),
            logvar.to(latent_dtype).detach().requires_grad_()], kwargs


def differentiable(args, kwargs):
    """The tensors of a case that require grad, with labels."""
    named = [("x", args[0]), ("x_hat", args[1]), ("mu", args[2]), ("logvar", args[3])]
    named += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return [(name, t) for name, t in named if t.requires_grad]


def cast(args, kwargs, dtype):
    """A copy of a case in another dtype (leaves again); beta stays as it is."""
    def convert(t):
        return t.detach().to(dtype).requires_grad_(t.requires_grad)
    new_args = [convert(t) for t in args]
    new_kwargs = {k: (convert(v) if isinstance(v, torch.Tensor) and k != "beta" else v)
                  for k, v in kwargs.items()}
    return new_args, new_kwargs
