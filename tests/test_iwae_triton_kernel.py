"""The Triton ``iwae`` kernel against the reference backend's (the oracle): every likelihood,
log-scale layout and prior, the offset, row weights, reductions, DReG, subsets of the wanted
gradients, S from 1 to 5000, empty dims, mixed dtypes, and bitwise repeatability.

Most cases run with tiles shrunk to 32 elements, so that small shapes still span several event
tiles, latent tiles, sample chunks and row groups (the interpreter runs 8 programs).

Runs on CPU under the interpreter: ``TRITON_INTERPRET=1 python -m pytest
tests/test_iwae_triton_kernel.py``.
"""
import os

import pytest
import torch

from conftest import backends_under_test

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                       or "triton" not in backends_under_test(),
                       reason="Triton backend tests run on CPU under TRITON_INTERPRET=1"),
]

pytest.importorskip("triton")

from fastvae._common import IWAE_INPUTS, accumulation_dtype  # noqa: E402
from fastvae.backends import reference  # noqa: E402
from fastvae.backends import triton as triton_backend  # noqa: E402
from fastvae.kernels import iwae as iwae_kernels  # noqa: E402
from op_args import elbo_args  # noqa: E402

OUTPUTS = ("loss", "log_weights") + tuple(f"grad_{name}" for name in IWAE_INPUTS)
CPU = torch.device("cpu")
LAYOUTS = ["SBD", "SB1", "S1D", "S11", "1BD", "1B1", "11D", "111"]  # x_log_scale [Sl, Bl, Dl]
# B = 11 rows on the interpreter's 8 programs: some programs add a second row to the partials
# of shared inputs. D = 40 and d = 40 span two 32-element tiles; S = 3 spans three chunks.
GRID = dict(samples=3, batch=11, features=40, latent=40)
SMALL = dict(samples=3, batch=4, features=5, latent=3)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 elements instead of 1024 (the plan is cached per shape: cleared around)."""
    monkeypatch.setattr(iwae_kernels, "_TILE", 32)
    iwae_kernels._plan.cache_clear()
    yield
    iwae_kernels._plan.cache_clear()


def iwae_args(*, samples, batch, features, latent, dtype=torch.float64, hat_dtype=None,
              scale_dtype=None, latent_dtype=None, log_scale=None, prior=None,
              likelihood="gaussian", reduction="sum", grad_scale=True, offset=True, dreg=False,
              needs="all", seed=0):
    """A backend's ``iwae`` arguments: ``elbo_args``' tensors (θ in ``scale_dtype``), z drawn
    from q(z|x), a log-weight offset and row weights (True: random) in the loss dtype."""
    base = elbo_args(samples=samples, batch=batch, features=features, latent=latent, dtype=dtype,
                     hat_dtype=hat_dtype, latent_dtype=latent_dtype, log_scale=log_scale,
                     prior=prior, likelihood=likelihood, reduction=reduction, seed=seed,
                     device=CPU)
    t = base.inputs
    theta = t["x_log_scale"]
    if theta is not None and scale_dtype is not None:
        theta = theta.to(scale_dtype)
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randn((samples, batch, latent), generator=g, dtype=torch.float64)
    z = (t["mu"].double() + torch.exp(0.5 * t["logvar"].double()) * noise).to(t["mu"].dtype)
    acc = accumulation_dtype(t["x"], t["x_hat"], theta, z)
    inputs = (t["x"], t["x_hat"], theta, z, t["mu"], t["logvar"], t["prior_mu"],
              t["prior_logvar"],
              torch.randn((samples, batch), generator=g, dtype=torch.float64).to(acc)
              if offset else None)
    row_weights = torch.rand(batch, generator=g, dtype=torch.float64).to(acc) \
        if grad_scale else None
    if needs == "all":
        needs = [tensor is not None for tensor in inputs]
    return (*inputs, row_weights, int(base.likelihood), float(base.x_log_scale_const),
            int(base.reduction), dreg, list(needs))


def _tolerance(dtype):
    """float64: 1e-12; float32: float32 rounding through an exp of log weights of size ~10;
    16-bit gradients: a rounding tie broken the other way (one unit in the last place)."""
    return {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3,
            torch.bfloat16: 1.6e-2}[dtype]


def _compare(args):
    got = triton_backend.iwae(*args)
    want = reference.iwae(*args)
    assert len(got) == len(want) == len(OUTPUTS)
    for name, g, w in zip(OUTPUTS, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype)
        tolerance = _tolerance(w.dtype)
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance, equal_nan=True,
                                   msg=name)
    return got, want


# ----------------------------------------------------------------------------------------------
# every option, in float64 against the oracle
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_log_scale_layout(small_tiles, layout, likelihood):
    _compare(iwae_args(**GRID, log_scale=layout, likelihood=likelihood, prior="datapoint"))


@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "laplace",
                                        "continuous_bernoulli"])
def test_every_likelihood_and_prior(small_tiles, likelihood, prior):
    _compare(iwae_args(**GRID, likelihood=likelihood, prior=prior))


@pytest.mark.parametrize("dreg", [False, True], ids=["iwae", "dreg"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "offset_and_row_weights"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reductions_row_weights_offset_and_dreg(small_tiles, reduction, weighted, dreg):
    _compare(iwae_args(**GRID, log_scale="1BD", prior="shared", reduction=reduction,
                       grad_scale=weighted, offset=weighted, dreg=dreg))


# Slots: x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset.
NEEDS = {
    "none": [False] * 9,
    "x_hat": [False, True] + [False] * 7,
    "dreg_z": [False] * 3 + [True] + [False] * 5,
    "offset": [False] * 8 + [True],
    "shared": [False, False, True, False, False, False, True, True, False],
    "data_and_posterior": [True, False, False, False, True, True, False, False, False],
}


@pytest.mark.parametrize("needs", NEEDS.values(), ids=NEEDS.keys())
def test_any_subset_of_gradients(small_tiles, needs):
    _compare(iwae_args(**GRID, log_scale="11D", prior="shared", needs=needs, dreg=True))


# ----------------------------------------------------------------------------------------------
# sizes: S from 1 to 5000 (streamed, never a block), empty dims
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_many_samples_stream(dtype):
    """S = 5000 with the default tiles: 79 chunks of 64 samples per row."""
    _compare(iwae_args(samples=5000, batch=2, features=3, latent=2, dtype=dtype,
                       log_scale="S11", prior="shared"))


@pytest.mark.parametrize("sizes", [
    dict(samples=1, batch=3, features=5, latent=2),
    dict(samples=3, batch=0, features=5, latent=2),
    dict(samples=3, batch=3, features=0, latent=2),
    dict(samples=3, batch=3, features=5, latent=0),
    dict(samples=2, batch=1, features=0, latent=0),
], ids=["one_sample", "empty_batch", "no_features", "no_latents", "nothing_but_offset"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_small_and_empty_sizes(sizes, reduction):
    _compare(iwae_args(**sizes, log_scale="1B1", prior="shared", reduction=reduction))


# ----------------------------------------------------------------------------------------------
# dtypes: float32 to its rounding, 16-bit inputs, each tensor its own dtype
# ----------------------------------------------------------------------------------------------
DTYPES = [  # x, x_hat, θ, latents
    (torch.float32, torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float32, torch.float32),
    (torch.float32, torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.bfloat16, torch.float64),
    (torch.float64, torch.bfloat16, torch.float16, torch.float32),
]


@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_mixed_dtypes(small_tiles, dtypes):
    x, x_hat, theta, latents = dtypes
    _compare(iwae_args(**SMALL, dtype=x, hat_dtype=x_hat, scale_dtype=theta,
                       latent_dtype=latents, log_scale="S1D", prior="datapoint"))


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------
def test_repeats_bitwise(small_tiles):
    """Shared θ and prior: per-program partials added row by row, summed in order."""
    args = iwae_args(**GRID, dtype=torch.float32, log_scale="11D", prior="shared",
                     reduction="none")
    first = triton_backend.iwae(*args)
    second = triton_backend.iwae(*args)
    for name, a, b in zip(OUTPUTS, first, second):
        assert torch.equal(a, b), name
