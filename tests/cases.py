"""The shared cases: inputs for every option of ``elbo_loss``, built in any dtype, on the test
device."""
import itertools
import os
from dataclasses import dataclass
from typing import Optional

import torch

# The device every shared case runs on: ``FASTVAE_TEST_DEVICE=cuda`` runs the suite on a GPU.
TEST_DEVICE = torch.device(os.environ.get("FASTVAE_TEST_DEVICE", "cpu"))
ON_CUDA = TEST_DEVICE.type == "cuda"


def generator(seed: int) -> torch.Generator:
    """A generator on the test device, seeded."""
    return torch.Generator(TEST_DEVICE).manual_seed(seed)


BATCH, EVENT, LATENT = 5, (2, 3, 2), (3,)
SAMPLES = 3
LIKELIHOODS = ("gaussian", "bernoulli", "laplace", "continuous_bernoulli")
# The likelihoods whose data x lies in [0, 1].
UNIT_INTERVAL = ("bernoulli", "continuous_bernoulli")
# The keyword of elbo_loss naming the decoder's log-scale tensor, and its constant scale.
LOG_SCALE_KEYWORD = {"gaussian": "x_logvar", "laplace": "x_logscale"}
SCALE_KEYWORD = {"gaussian": "sigma", "laplace": "scale"}


@dataclass(frozen=True)
class Case:
    name: str
    likelihood: str = "gaussian"
    # None | const | const_tensor (sigma / scale) | scalar | event | channel | datapoint | full
    # (x_logvar / x_logscale of that layout)
    decoder_scale: Optional[str] = None
    samples: Optional[int] = None
    prior: Optional[str] = None        # None | shared | datapoint | mu_only | channel
    free_bits: float = 0.0
    beta: object = 1.0                 # float, or "tensor" for a 0-dim tensor requiring grad
    batch: int = BATCH
    event: tuple = EVENT
    latent: tuple = LATENT
    x_requires_grad: bool = True

    def __str__(self):
        return self.name


SCALE_LAYOUTS = ("scalar", "event", "channel", "datapoint", "full")

CASES = [
    Case("unit_sigma"),
    Case("sigma_float", decoder_scale="const"),
    Case("sigma_tensor", decoder_scale="const_tensor"),
    *[Case(f"logvar_{layout}", decoder_scale=layout) for layout in SCALE_LAYOUTS],
    Case("samples_full", decoder_scale="full", samples=SAMPLES),
    Case("samples_datapoint", decoder_scale="datapoint", samples=SAMPLES),
    Case("samples_event", decoder_scale="event", samples=SAMPLES),
    Case("bernoulli", likelihood="bernoulli"),
    Case("bernoulli_samples", likelihood="bernoulli", samples=SAMPLES),
    Case("continuous_bernoulli", likelihood="continuous_bernoulli"),
    Case("continuous_bernoulli_samples", likelihood="continuous_bernoulli", samples=SAMPLES,
         prior="shared", free_bits=0.6),
    Case("laplace_unit", likelihood="laplace"),
    Case("laplace_scale_float", likelihood="laplace", decoder_scale="const"),
    Case("laplace_scale_tensor", likelihood="laplace", decoder_scale="const_tensor"),
    *[Case(f"laplace_logscale_{layout}", likelihood="laplace", decoder_scale=layout)
      for layout in SCALE_LAYOUTS],
    Case("laplace_samples_full", likelihood="laplace", decoder_scale="full", samples=SAMPLES),
    Case("laplace_samples_event", likelihood="laplace", decoder_scale="event", samples=SAMPLES),
    Case("prior_shared", prior="shared", decoder_scale="full"),
    Case("prior_datapoint", prior="datapoint"),
    Case("prior_mu_only", prior="mu_only"),
    Case("free_bits", free_bits=0.6, decoder_scale="full"),
    Case("free_bits_prior", free_bits=0.6, prior="shared"),
    Case("beta_tensor", beta="tensor", decoder_scale="event"),
    Case("beta_float", beta=0.25, likelihood="bernoulli"),
    Case("batch_one", batch=1, decoder_scale="event", prior="shared"),
    Case("flat_event", event=(7,), latent=(4,), decoder_scale="datapoint"),
    Case("latent_2d", latent=(2, 3), prior="shared"),
    Case("latent_conv", latent=(4, 8, 8), prior="channel", free_bits=0.6, samples=2,
         decoder_scale="channel"),
]


def _cross_product():
    """β a tensor requiring grad × free bits × prior, each combination once (the reduction is
    the tests' own parameter); the likelihood and decoder scale rotate so every combination
    also meets a different decoder."""
    decoders = itertools.cycle([("gaussian", "full"), ("laplace", "event"), ("bernoulli", None),
                                ("gaussian", "const"), ("laplace", "datapoint")])
    cases = []
    for free_bits, prior in itertools.product((0.0, 0.6), (None, "shared", "datapoint", "mu_only")):
        likelihood, decoder_scale = next(decoders)
        name = f"x_beta_grad_fb{free_bits:g}_prior_{prior or 'none'}_{likelihood}"
        cases.append(Case(name, likelihood=likelihood, decoder_scale=decoder_scale, prior=prior,
                          free_bits=free_bits, beta="tensor"))
    return cases


CASES += _cross_product()
CASE_BY_NAME = {case.name: case for case in CASES}
assert len(CASE_BY_NAME) == len(CASES), "case names must be unique"


def pick(*names):
    return [CASE_BY_NAME[name] for name in names]


def build(case: Case, dtype=torch.float64, latent_dtype=None, generator=None):
    """(positional args, keyword args) for ``elbo_loss``; every floating tensor requires grad.

    The encoder means are scaled per latent element from 0.1 to 2 so that with free bits some
    dims are clamped and some active (``test_free_bits_cases_clamp_some_dims`` checks it)."""
    latent_dtype = latent_dtype or dtype
    g = generator
    device = g.device if g is not None else TEST_DEVICE

    def draw(shape, scale=1.0, shift=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float64, device=device) * scale + shift

    def leaf(shape, scale=1.0, shift=0.0, dt=dtype):
        return draw(shape, scale, shift).to(dt).requires_grad_()

    data_shape = (case.batch,) + case.event
    hat_shape = data_shape if case.samples is None else (case.samples,) + data_shape
    if case.likelihood in UNIT_INTERVAL:
        x = torch.rand(data_shape, generator=g, dtype=torch.float64, device=device).to(dtype)
    else:
        x = draw(data_shape).to(dtype)
    x.requires_grad_(case.x_requires_grad)
    x_hat = leaf(hat_shape)
    latent_shape = (case.batch,) + case.latent
    spread = torch.linspace(0.1, 2.0, max(1, int(torch.tensor(case.latent).prod())),
                            dtype=torch.float64, device=device).view(case.latent)
    mu = (draw(latent_shape) * spread).to(latent_dtype).requires_grad_()
    logvar = leaf(latent_shape, scale=0.5, dt=latent_dtype)
    kwargs = {"likelihood": case.likelihood}
    kwargs.update(_decoder_scale(case, data_shape, hat_shape, leaf, g, dtype, device))
    kwargs.update(_prior(case, latent_shape, leaf, latent_dtype, spread))
    if case.free_bits:
        kwargs["free_bits"] = case.free_bits
    if case.beta == "tensor":
        kwargs["beta"] = torch.tensor(0.7, dtype=torch.float64, device=device).requires_grad_()
    elif case.beta != 1.0:
        kwargs["beta"] = case.beta
    return [x, x_hat, mu, logvar], kwargs


def _decoder_scale(case, data_shape, hat_shape, leaf, g, dtype, device):
    if case.decoder_scale is None:
        return {}
    if case.decoder_scale == "const":
        return {SCALE_KEYWORD[case.likelihood]: 0.7}
    if case.decoder_scale == "const_tensor":
        scale = torch.rand(case.event, generator=g, dtype=torch.float64, device=device) + 0.5
        return {SCALE_KEYWORD[case.likelihood]: scale.to(dtype).requires_grad_()}
    shapes = {"scalar": (), "event": case.event,
              "channel": (case.event[0],) + (1,) * (len(case.event) - 1),
              "datapoint": data_shape, "full": hat_shape}
    return {LOG_SCALE_KEYWORD[case.likelihood]: leaf(shapes[case.decoder_scale], scale=0.5)}


def _prior(case, latent_shape, leaf, latent_dtype, spread):
    """The prior, spread over the latent dims like mu (except per channel)."""
    shapes = {"shared": case.latent, "datapoint": latent_shape, "mu_only": case.latent,
              "channel": (case.latent[0],) + (1,) * (len(case.latent) - 1)}
    if case.prior is None:
        return {}
    scale = 0.5 if case.prior == "channel" else 0.5 * spread

    def draw():
        return leaf(shapes[case.prior], dt=torch.float64).detach().mul(scale).to(latent_dtype)

    prior = {"prior_mu": draw().requires_grad_()}
    if case.prior != "mu_only":
        prior["prior_logvar"] = draw().requires_grad_()
    return prior


POSITIONAL = ("x", "x_hat", "mu", "logvar")


def differentiable(args, kwargs):
    """The tensors of a case that require grad, with labels."""
    named = list(zip(POSITIONAL, args))
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
