"""The native kernels of the importance-weighted bound op, ``torch.ops.fastvae_native.iwae``,
against the reference backend (the oracle): every likelihood and θ layout, the priors, the
offset, the row weights, every reduction, DReG, subsets of the gradients, S from 1 to 5000,
empty dims, mixed dtypes; bitwise repeatability (also across thread counts); and the errors,
which name the argument."""
import itertools
import re

import pytest
import torch

from cases import TEST_DEVICE
from conftest import cpu_only, intra_op_threads
from fastvae._common import IWAE_INPUTS, Likelihood, Reduction, accumulation_dtype

native = pytest.importorskip("fastvae.backends.native", reason="fastvae._C not built")
from fastvae.backends import reference  # noqa: E402

pytestmark = pytest.mark.skipif(TEST_DEVICE.type not in native.DEVICE_TYPES,
                                reason=f"the native extension is not built for {TEST_DEVICE.type}")

OUTPUTS = ("loss", "log_weights") + tuple(f"grad_{name}" for name in IWAE_INPUTS)
SLOT = {name: i for i, name in enumerate(IWAE_INPUTS)}
LIKELIHOODS = ("gaussian", "bernoulli", "laplace", "continuous_bernoulli")
SCALE_LAYOUTS = (None, "SBD", "1BD", "S1D", "11D", "SB1", "1B1", "S11", "111")
# Relative tolerances: float64 to ~1e-12; float32 to its rounding (the float32 reference's own
# error grows with |log w|, hence the margin); 16-bit gradients to their rounding.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def iwae_args(*, samples=3, batch=5, features=7, latent=3, dtype=torch.float64, hat_dtype=None,
              scale_dtype=None, latent_dtype=None, log_scale="SBD", prior=None,
              likelihood="gaussian", reduction="mean", offset=False, grad_scale=False, dreg=False,
              needs="all", x_log_scale_const=-0.3, seed=0):
    """The op's arguments, as a tuple, for ``x [B, D]``, ``x_hat [S, B, D]``, ``z [S, B, d]``.

    log_scale: None (the constant) or θ's ``[Sl, Bl, Dl]`` as three characters, each the dim's
    letter (full) or '1'. prior: None | 'shared' ``[1, d]`` | 'datapoint' ``[B, d]``.
    needs: 'all' (every given input) or 9 bools.
    """
    g = torch.Generator(TEST_DEVICE).manual_seed(seed)

    def draw(*shape, scale=1.0, dt=dtype):
        values = torch.randn(shape, generator=g, dtype=torch.float64, device=TEST_DEVICE)
        return (values * scale).to(dt)

    likelihood = Likelihood[likelihood.upper()]
    latent_dtype = latent_dtype or dtype
    if likelihood in (Likelihood.BERNOULLI, Likelihood.CONTINUOUS_BERNOULLI):
        x = torch.rand(batch, features, generator=g, dtype=torch.float64, device=TEST_DEVICE)
        x = x.to(dtype)
    else:
        x = draw(batch, features)
    full = {"S": samples, "B": batch, "D": features, "1": 1}
    theta = None if log_scale is None else \
        draw(*(full[c] for c in log_scale), scale=0.5, dt=scale_dtype or dtype)
    mu, logvar = draw(batch, latent), draw(batch, latent, scale=0.5)
    z = mu + torch.exp(0.5 * logvar) * draw(samples, batch, latent)
    prior_mu = prior_logvar = None
    if prior is not None:
        rows = {"shared": 1, "datapoint": batch}[prior]
        prior_mu, prior_logvar = draw(rows, latent, scale=0.5), draw(rows, latent, scale=0.5)
    latents = [None if t is None else t.to(latent_dtype) for t in (z, mu, logvar, prior_mu,
                                                                     prior_logvar)]
    loss_dtype = accumulation_dtype(x, x_hat := draw(samples, batch, features, dt=hat_dtype or dtype),
                                    theta, latents[0])
    inputs = [x, x_hat, theta, *latents, draw(samples, batch, dt=loss_dtype) if offset else None]
    weights = torch.rand(batch, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    needs = [t is not None for t in inputs] if needs == "all" else list(needs)
    return (*inputs, weights.to(loss_dtype) if grad_scale else None, int(likelihood),
            float(x_log_scale_const), int(Reduction[reduction.upper()]), dreg, needs)


def _tolerance(tensor):
    return TOLERANCE[tensor.dtype]


def assert_matches_reference(args, tolerance=None):
    """Native against reference, output by output; returns the native outputs."""
    actual, expected = native.iwae(*args), reference.iwae(*args)
    assert len(actual) == len(OUTPUTS)
    for name, a, e in zip(OUTPUTS, actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape, \
            f"{name}: {a.dtype} {tuple(a.shape)}, expected {e.dtype} {tuple(e.shape)}"
        if e.numel() == 0:
            continue
        rtol = tolerance or _tolerance(e)
        magnitude = e.double().abs().nan_to_num(posinf=0.0).max().item()
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * max(magnitude, 1.0),
                                   equal_nan=True, msg=lambda m: f"{name}: {m}")
    return actual


# ---------------------------------------------------------------------------------------------
# agreement with the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood,log_scale", [
    *[(lik, layout) for lik in ("gaussian", "laplace") for layout in SCALE_LAYOUTS],
    # The Bernoullis take no θ (the op layer passes none).
    ("bernoulli", None), ("continuous_bernoulli", None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_likelihoods_and_scale_layouts(likelihood, log_scale, dtype):
    assert_matches_reference(iwae_args(likelihood=likelihood, log_scale=log_scale, dtype=dtype,
                                       prior="datapoint", offset=True, grad_scale=True))


@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("offset,grad_scale,dreg", list(itertools.product((False, True), repeat=3)))
def test_priors_reductions_offset_weights_dreg(prior, reduction, offset, grad_scale, dreg):
    assert_matches_reference(iwae_args(prior=prior, reduction=reduction, offset=offset,
                                       grad_scale=grad_scale, dreg=dreg, log_scale="11D"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dreg_changes_only_the_z_gradient(dtype):
    plain = native.iwae(*iwae_args(dtype=dtype, prior="shared", offset=True, dreg=False))
    dreg = native.iwae(*iwae_args(dtype=dtype, prior="shared", offset=True, dreg=True))
    for name, a, b in zip(OUTPUTS, plain, dreg):
        assert torch.equal(a, b) != (name == "grad_z"), name


@pytest.mark.parametrize("needs", [
    [False] * 9, *[[slot == i for slot in range(9)] for i in range(9)],
    [True, False, True, False, True, False, True, False, True],
    [False, True, False, True, False, True, False, True, False]],
    ids=lambda needs: "".join("1" if need else "0" for need in needs))
def test_subsets_of_gradients(needs):
    args = iwae_args(prior="shared", offset=True, log_scale="1B1", needs=needs)
    outputs = assert_matches_reference(args)
    for name, grad, need in zip(IWAE_INPUTS, outputs[2:], needs):
        assert (grad.numel() == 0) != need or args[SLOT[name]].numel() == 0, name


@pytest.mark.parametrize("samples", [1, 2, 17, 5000])
def test_sample_counts(samples):
    """S is not bounded by any stack array: 5000 samples of a small row."""
    features, latent = (4, 2) if samples == 5000 else (9, 5)
    assert_matches_reference(iwae_args(samples=samples, batch=3, features=features, latent=latent,
                                       prior="shared", log_scale="S11", offset=True,
                                       grad_scale=True))


@pytest.mark.parametrize("shape", [dict(batch=0), dict(features=0), dict(latent=0),
                                   dict(batch=0, features=0, latent=0)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("log_scale,prior", [("11D", "shared"), ("S11", "datapoint"),
                                             (None, None)])
def test_empty_dims(shape, reduction, log_scale, prior):
    assert_matches_reference(iwae_args(**shape, reduction=reduction, log_scale=log_scale,
                                       prior=prior, offset=True))


def test_wide_rows_span_several_tiles():
    """D and d beyond one tile (512) of the CPU kernel, with θ along D and a shared prior."""
    assert_matches_reference(iwae_args(samples=2, batch=3, features=1100, latent=600,
                                       log_scale="S1D", prior="shared", grad_scale=True))


@pytest.mark.parametrize("x_dtype,hat_dtype,scale_dtype,latent_dtype", [
    (torch.float16, torch.float16, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float16, torch.float64, torch.float16),
    (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    (torch.float32, torch.float32, torch.float32, torch.float64),
], ids=str)
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_mixed_dtypes(x_dtype, hat_dtype, scale_dtype, latent_dtype, likelihood):
    scale = "1BD" if likelihood == "gaussian" else None
    args = iwae_args(dtype=x_dtype, hat_dtype=hat_dtype, scale_dtype=scale_dtype,
                     latent_dtype=latent_dtype, log_scale=scale, likelihood=likelihood,
                     prior="shared", offset=True, grad_scale=True)
    loss_dtype = accumulation_dtype(*args[:4])
    # The 16-bit inputs are read alike by both; the 16-bit gradients are rounded alike.
    assert_matches_reference(args, tolerance=TOLERANCE[loss_dtype] if all(
        t is None or t.dtype in (torch.float32, torch.float64) for t in args[:9]) else 1e-2)


# ---------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------
def test_bitwise_repeatable():
    args = iwae_args(samples=4, batch=300, features=40, latent=6, dtype=torch.float32,
                     log_scale="11D", prior="shared", offset=True, grad_scale=True, dreg=True)
    first, second = native.iwae(*args), native.iwae(*args)
    for name, a, b in zip(OUTPUTS, first, second):
        assert torch.equal(a, b), name


@cpu_only
@pytest.mark.parametrize("log_scale,prior", [("11D", "shared"), ("S11", "shared"),
                                             ("1B1", "datapoint")])
def test_bitwise_equal_across_thread_counts(log_scale, prior):
    """B = 2048: 8 chunks of 256 rows, so the sums over rows are split between threads."""
    args = iwae_args(samples=3, batch=2048, features=50, latent=8, dtype=torch.float32,
                     log_scale=log_scale, prior=prior, offset=True, reduction="sum")
    with intra_op_threads(1):
        one = native.iwae(*args)
    with intra_op_threads(2):
        two = native.iwae(*args)
    for name, a, b in zip(OUTPUTS, one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    assert_matches_reference(args, tolerance=1e-4)


def test_opcheck():
    """Schema, fake implementation and dispatch of the raw native op."""
    for options in ({}, {"dtype": torch.float32, "prior": "shared", "reduction": "none",
                         "offset": True, "grad_scale": True, "dreg": True}):
        args = iwae_args(**options)
        torch.library.opcheck(torch.ops.fastvae_native.iwae.default, args)
        # With every input requiring grad: the op's C++ autograd. needs_grad as the API forms
        # it: under 'none' a shared prior's gradient cannot take row weights, so none is formed
        # in forward and backward recomputes them.
        leaves = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) and i < 9 else t
                  for i, t in enumerate(args)]
        if options.get("reduction") == "none":
            leaves[-1] = [False] * 9
        torch.library.opcheck(torch.ops.fastvae_native.iwae.default, tuple(leaves))


# ---------------------------------------------------------------------------------------------
# errors name the argument
# ---------------------------------------------------------------------------------------------
def _replace(args, **changes):
    args = list(args)
    for name, value in changes.items():
        index = SLOT[name] if name in SLOT else \
            {"grad_scale": 9, "likelihood": 10, "reduction": 12, "needs_grad": 14}[name]
        args[index] = value
    return tuple(args)


def _bad_cases():
    base = iwae_args(prior="datapoint", offset=True, grad_scale=True, dtype=torch.float32)
    x, x_hat, theta, z, mu, logvar, prior_mu, prior_logvar, offset = base[:9]
    return {
        "x_hat batch": (dict(x_hat=x_hat[:, :4]), "x_hat"),
        "x_hat no samples": (dict(x_hat=x_hat[:0], theta=None, z=z[:0], log_weight_offset=None),
                             "sample"),
        "x_log_scale size": (dict(x_log_scale=theta[:, :, :3]), "x_log_scale"),
        "x_log_scale integer": (dict(x_log_scale=theta.to(torch.int32)), "x_log_scale"),
        "z samples": (dict(z=z[:2]), "z"),
        "z rank": (dict(z=z[0]), "z"),
        "z dtype": (dict(z=z.double()), "z"),
        "z non-contiguous": (dict(z=z.transpose(0, 1).contiguous().transpose(0, 1)), "z"),
        "mu rows": (dict(mu=mu[:4]), "mu"),
        "logvar dtype": (dict(logvar=logvar.double()), "logvar"),
        "prior rows": (dict(prior_mu=prior_mu[:2], prior_logvar=prior_logvar[:2]), "prior_mu"),
        "prior alone": (dict(prior_logvar=None, needs_grad=[True] * 7 + [False, True]), "prior"),
        "offset shape": (dict(log_weight_offset=offset[:, :2]), "log_weight_offset"),
        "offset integer": (dict(log_weight_offset=offset.to(torch.int64)), "log_weight_offset"),
        "grad_scale size": (dict(grad_scale=base[9][:2]), "grad_scale"),
        "likelihood": (dict(likelihood=7), "likelihood"),
        "reduction": (dict(reduction=5), "reduction"),
        "needs_grad absent": (dict(x_log_scale=None), "needs_grad[2]"),
    }, base


@pytest.mark.parametrize("case", list(_bad_cases()[0]))
def test_errors_name_the_argument(case):
    cases, base = _bad_cases()
    changes, name = cases[case]
    if "theta" in changes:
        changes["x_log_scale"] = changes.pop("theta")
    with pytest.raises(RuntimeError, match=f"fastvae_native::iwae: .*{re.escape(name)}"):
        native.iwae(*_replace(base, **changes))


@pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="needs a second device type")
def test_device_mismatch_names_the_argument():
    base = iwae_args()
    with pytest.raises(RuntimeError, match="fastvae_native::iwae: .*logvar"):
        native.iwae(*_replace(base, logvar=base[SLOT["logvar"]].cpu()))
