"""Every bad input raises ValueError/TypeError naming what is wrong, before any kernel runs, on
every backend. The valid tensors are made inside the test, on the test device, so that only
the cases about devices mix devices."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import fastvae
from cases import TEST_DEVICE
from fastvae import backends


def valid():
    return SimpleNamespace(x=torch.randn(4, 6), x_hat=torch.randn(4, 6), mu=torch.randn(4, 3),
                           logvar=torch.randn(4, 3))


def elbo(**overrides):
    def call(v):
        args = {"x": v.x, "x_hat": v.x_hat, "mu": v.mu, "logvar": v.logvar, **overrides}
        args = {k: (a(v) if callable(a) else a) for k, a in args.items()}
        positional = [args.pop(k) for k in ("x", "x_hat", "mu", "logvar")]
        return fastvae.elbo_loss(*positional, **args)
    return call


def integer(*shape):
    return lambda v: torch.ones(shape, dtype=torch.int64)


# Every tensor argument of every function, (function, keyword, likelihood, a valid shape).
TENSOR_ARGUMENTS = [
    ("elbo_loss", "x", None, (4, 6)), ("elbo_loss", "x_hat", None, (4, 6)),
    ("elbo_loss", "mu", None, (4, 3)), ("elbo_loss", "logvar", None, (4, 3)),
    ("elbo_loss", "x_logvar", "gaussian", (6,)), ("elbo_loss", "sigma", "gaussian", (6,)),
    ("elbo_loss", "x_logscale", "laplace", (6,)), ("elbo_loss", "scale", "laplace", (6,)),
    ("elbo_loss", "prior_mu", None, (3,)), ("elbo_loss", "prior_logvar", None, (3,)),
    ("elbo_loss", "beta", None, ()),
    ("gaussian_kl", "mu", None, (4, 3)), ("gaussian_kl", "logvar", None, (4, 3)),
    ("gaussian_kl", "prior_mu", None, (3,)), ("gaussian_kl", "prior_logvar", None, (3,)),
    ("gaussian_nll", "x", None, (4, 6)), ("gaussian_nll", "mean", None, (4, 6)),
    ("gaussian_nll", "logvar", None, (6,)), ("gaussian_nll", "sigma", None, (6,)),
    ("laplace_nll", "x", None, (4, 6)), ("laplace_nll", "loc", None, (4, 6)),
    ("laplace_nll", "log_scale", None, (6,)), ("laplace_nll", "scale", None, (6,)),
    ("bernoulli_nll", "x", None, (4, 6)), ("bernoulli_nll", "logits", None, (4, 6)),
    ("reparameterize", "mu", None, (4, 3)), ("reparameterize", "logvar", None, (4, 3)),
]
REQUIRED = {"elbo_loss": ("x", "x_hat", "mu", "logvar"), "gaussian_kl": ("mu", "logvar"),
            "gaussian_nll": ("x", "mean"), "laplace_nll": ("x", "loc"),
            "bernoulli_nll": ("x", "logits"), "reparameterize": ("mu", "logvar")}


def call_with(function, keyword, likelihood, value):
    """Calls ``fastvae.<function>`` with valid arguments except ``keyword`` = value(v)."""
    def call(v):
        shapes = {"x": v.x, "x_hat": v.x_hat, "mean": v.x_hat, "loc": v.x_hat,
                  "logits": v.x_hat, "mu": v.mu, "logvar": v.logvar}
        required = [value(v) if name == keyword else shapes[name]
                    for name in REQUIRED[function]]
        options = {} if keyword in REQUIRED[function] else {keyword: value(v)}
        if likelihood is not None:
            options["likelihood"] = likelihood
        return getattr(fastvae, function)(*required, **options)
    return call


BAD_DTYPE = [(f"{f} {k} integer", call_with(f, k, lik, lambda v, s=shape: torch.ones(s, dtype=torch.int64)),
              TypeError, rf"{k}\b.*(float|floating)")
             for f, k, lik, shape in TENSOR_ARGUMENTS]
NOT_A_TENSOR = [(f"{f} {k} list", call_with(f, k, lik, lambda v, s=shape: [torch.ones(s).tolist()]),
                 TypeError, rf"{k}\b") for f, k, lik, shape in TENSOR_ARGUMENTS]

BAD_INPUTS = BAD_DTYPE + NOT_A_TENSOR + [
    ("x_hat shape", elbo(x_hat=lambda v: torch.randn(4, 5)), ValueError, r"x_hat.*\(4, 6\).*\(4, 5\)"),
    ("sample dim shape", elbo(x_hat=lambda v: torch.randn(2, 3, 6)), ValueError, r"x_hat"),
    ("mu batch", elbo(mu=lambda v: torch.randn(5, 3), logvar=lambda v: torch.randn(5, 3)),
     ValueError, r"mu.*B = 4"),
    ("mu vs logvar", elbo(logvar=lambda v: torch.randn(4, 2)), ValueError,
     r"mu and logvar.*\(4, 3\).*\(4, 2\)"),
    ("mu 1-dim", elbo(mu=lambda v: torch.randn(4), logvar=lambda v: torch.randn(4)), ValueError,
     r"mu must be \[B, \*latent\]"),
    ("likelihood", elbo(likelihood="poisson"), ValueError, r"likelihood.*'poisson'"),
    ("reduction", elbo(reduction="batchmean"), ValueError, r"reduction.*'batchmean'"),
    ("free bits", elbo(free_bits=-0.1), ValueError, r"free_bits must be >= 0"),
    ("free bits nan", elbo(free_bits=float("nan")), ValueError, r"free_bits must not be NaN"),
    ("free bits inf", elbo(free_bits=float("inf")), ValueError, r"free_bits must be finite, got inf"),
    ("beta inf", elbo(beta=float("inf")), ValueError, r"beta must be finite, got inf"),
    ("sigma inf", elbo(sigma=float("inf")), ValueError, r"sigma must be finite, got inf"),
    ("scale -inf", elbo(likelihood="laplace", scale=-float("inf")), ValueError,
     r"scale must be finite, got -inf"),
    ("return_terms not a bool", elbo(return_terms="yes"), TypeError,
     r"return_terms must be a bool, got str"),
    ("sigma zero", elbo(sigma=0.0), ValueError, r"sigma must be > 0"),
    ("sigma negative tensor", elbo(sigma=lambda v: torch.tensor([-1.0] * 6)), ValueError, r"sigma must be > 0"),
    ("scale zero", elbo(likelihood="laplace", scale=0.0), ValueError, r"scale must be > 0"),
    ("scale negative tensor", elbo(likelihood="laplace", scale=lambda v: -torch.ones(6)), ValueError,
     r"scale must be > 0"),
    ("sigma and x_logvar", elbo(sigma=1.0, x_logvar=lambda v: torch.zeros(6)), ValueError,
     r"either x_logvar or sigma"),
    ("scale and x_logscale", elbo(likelihood="laplace", scale=1.0, x_logscale=lambda v: torch.zeros(6)),
     ValueError, r"either x_logscale or scale"),
    ("bernoulli sigma", elbo(likelihood="bernoulli", sigma=1.0), ValueError, r"sigma.*bernoulli"),
    ("bernoulli x_logvar", elbo(likelihood="bernoulli", x_logvar=lambda v: torch.zeros(6)), ValueError,
     r"x_logvar.*bernoulli"),
    ("bernoulli x_logscale", elbo(likelihood="bernoulli", x_logscale=lambda v: torch.zeros(6)), ValueError,
     r"x_logscale.*bernoulli"),
    ("gaussian scale", elbo(scale=2.0), ValueError, r"scale.*gaussian"),
    ("gaussian x_logscale", elbo(x_logscale=lambda v: torch.zeros(6)), ValueError, r"x_logscale.*gaussian"),
    ("laplace sigma", elbo(likelihood="laplace", sigma=2.0), ValueError, r"sigma.*laplace"),
    ("laplace x_logvar", elbo(likelihood="laplace", x_logvar=lambda v: torch.zeros(6)), ValueError,
     r"x_logvar.*laplace"),
    ("x_logvar shape", elbo(x_logvar=lambda v: torch.zeros(5)), ValueError, r"x_logvar of shape \(5,\).*x_hat"),
    ("x_logvar larger", elbo(x_logvar=lambda v: torch.zeros(2, 4, 6)), ValueError, r"x_logvar"),
    ("x_logscale shape", elbo(likelihood="laplace", x_logscale=lambda v: torch.zeros(4, 5)), ValueError,
     r"x_logscale of shape \(4, 5\)"),
    ("prior shape", elbo(prior_mu=lambda v: torch.zeros(2)), ValueError, r"prior_mu of shape \(2,\).*mu"),
    ("beta shape", elbo(beta=lambda v: torch.ones(2)), ValueError, r"beta must be a float or a 0-dim"),
    ("beta negative", elbo(beta=-1.0), ValueError, r"beta must be >= 0"),
    ("beta string", elbo(beta="1"), TypeError, r"beta must be a real number"),
    ("mixed devices", elbo(mu=lambda v: torch.randn(4, 3, device="meta"),
                           logvar=lambda v: torch.randn(4, 3, device="meta")),
     ValueError, r"one device.*mu on meta"),
    ("mixed devices x_logvar", elbo(x_logvar=lambda v: torch.zeros(6, device="meta")), ValueError,
     r"one device"),
    ("sample count", lambda v: fastvae.reparameterize(v.mu, v.logvar, 0), ValueError, r"n_samples must be >= 1"),
    ("sample type", lambda v: fastvae.reparameterize(v.mu, v.logvar, 2.0), TypeError, r"n_samples must be an int"),
    ("seed range", lambda v: fastvae.reparameterize(v.mu, v.logvar, seed=-1), ValueError,
     r"seed must be in \[0, 2\*\*63\)"),
    ("seed type", lambda v: fastvae.reparameterize(v.mu, v.logvar, seed=1.5), TypeError, r"seed must be an int"),
    ("seed tensor shape", lambda v: fastvae.reparameterize(v.mu, v.logvar, seed=torch.tensor([1])),
     TypeError, r"0-dim int64"),
    ("seed tensor dtype", lambda v: fastvae.reparameterize(v.mu, v.logvar, seed=torch.tensor(1.0)),
     TypeError, r"0-dim int64"),
    ("seed device", lambda v: fastvae.reparameterize(v.mu, v.logvar, seed=torch.tensor(1, device="meta")),
     ValueError, r"one device"),
    ("generator", lambda v: fastvae.reparameterize(v.mu, v.logvar, generator=3), TypeError, r"generator"),
    ("sampling shapes", lambda v: fastvae.reparameterize(v.mu, torch.randn(4, 2)), ValueError, r"mu and logvar"),
    ("kl 0-dim", lambda v: fastvae.gaussian_kl(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"mu"),
    ("kl prior", lambda v: fastvae.gaussian_kl(v.mu, v.logvar, prior_logvar=torch.zeros(4)), ValueError,
     r"prior_logvar"),
    ("nll reduction", lambda v: fastvae.gaussian_nll(v.x, v.x_hat, reduction="avg"), ValueError, r"reduction"),
    ("nll both", lambda v: fastvae.gaussian_nll(v.x, v.x_hat, torch.zeros(6), sigma=2.0), ValueError,
     r"not both"),
    ("laplace nll both", lambda v: fastvae.laplace_nll(v.x, v.x_hat, torch.zeros(6), scale=2.0), ValueError,
     r"not both"),
    ("laplace nll scale", lambda v: fastvae.laplace_nll(v.x, v.x_hat, scale=-1.0), ValueError,
     r"scale must be > 0"),
    ("nll x 0-dim", lambda v: fastvae.gaussian_nll(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"x must be"),
    ("bernoulli shape", lambda v: fastvae.bernoulli_nll(v.x, torch.randn(4, 7)), ValueError, r"logits"),
    ("module likelihood", lambda v: fastvae.ELBOLoss(likelihood="poisson"), ValueError, r"likelihood"),
    ("module sigma", lambda v: fastvae.ELBOLoss(sigma=-2.0), ValueError, r"sigma must be > 0"),
    ("backend name", lambda v: fastvae.set_backend("cuda"), ValueError, r"unknown backend 'cuda'"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_before_any_kernel(backend, monkeypatch, call, error, message):
    module = backends.module(backend)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for name in ("elbo", "reparameterize_forward", "reparameterize_backward", "scale_"):
        monkeypatch.setattr(module, name, no_kernel)
    v = valid()
    with pytest.raises(error, match=message):
        call(v)


def test_use_backend_restores_selection():
    before = fastvae.get_backend()
    with fastvae.use_backend("reference"):
        assert fastvae.get_backend() == "reference"
    assert fastvae.get_backend() == before


@pytest.mark.parametrize("value, printed", [("reference", "reference"),
                                            ("bogus", "unknown backend 'bogus'")])
def test_environment_variable_sets_default(value, printed):
    script = ("import fastvae\ntry:\n    print(fastvae.get_backend())\n"
              "except ValueError as error:\n    print(error)")
    env = {**os.environ, "FASTVAE_BACKEND": value}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=True)
    assert printed in result.stdout


def test_a_backend_that_cannot_run_on_the_device_is_refused():
    """Selecting a backend for a device it does not run on raises a ValueError saying so,
    at the first call; the backends available_backends lists for the device never do."""
    listed = fastvae.available_backends(TEST_DEVICE)
    for name in ("native", "reference", "triton"):
        try:
            module = backends.module(name)
        except RuntimeError:
            assert name not in listed, name
            continue
        runs = TEST_DEVICE.type in module.DEVICE_TYPES
        assert (name in listed) == runs, (name, listed)
        if not runs:
            with fastvae.use_backend(name), pytest.raises(ValueError, match=name):
                fastvae.gaussian_kl(torch.zeros(2, 3, device=TEST_DEVICE),
                                    torch.zeros(2, 3, device=TEST_DEVICE))


# The general cases below came out of mutation testing (tests/mutation/): a check that names
# one argument fewer, a message that names the wrong type, and the boundaries of the ranges.

# beta is left out: a 0-dim beta tensor is moved to the data's device, like a 0-dim CPU tensor
# in PyTorch's own ops.
DEVICE_ARGUMENTS = [argument for argument in TENSOR_ARGUMENTS if argument[1] != "beta"]


@pytest.mark.parametrize("function, keyword, likelihood, shape", DEVICE_ARGUMENTS,
                         ids=[f"{f} {k}" for f, k, _, _ in DEVICE_ARGUMENTS])
def test_every_tensor_argument_on_another_device_is_refused(backend, monkeypatch, function,
                                                            keyword, likelihood, shape):
    """Any one tensor argument on another device (meta) than the rest raises a ValueError
    before any kernel runs."""
    module = backends.module(backend)
    for name in ("elbo", "reparameterize_forward", "reparameterize_backward", "scale_"):
        monkeypatch.setattr(module, name, lambda *args, **kwargs: pytest.fail("a kernel ran"))
    call = call_with(function, keyword, likelihood,
                     lambda v, s=shape: torch.ones(s, device="meta"))
    with pytest.raises(ValueError, match=r"all tensors must be on one device"):
        call(valid())


@pytest.mark.parametrize("function", ["elbo_loss", "gaussian_nll", "laplace_nll", "bernoulli_nll"])
def test_bad_reduction_is_named_for_every_function(backend, function):
    call = call_with(function, "reduction", None, lambda v: "avg")
    with pytest.raises(ValueError, match=r"^reduction must be one of \['none', 'mean', 'sum'\], "
                                         r"got 'avg'$"):
        call(valid())


@pytest.mark.parametrize("call, message", [
    (lambda v: fastvae.reparameterize(v.mu, v.logvar, seed=1.5), r"seed must be an int, got float$"),
    (lambda v: fastvae.reparameterize(v.mu, v.logvar, 2.0), r"n_samples .*, got float$"),
    (lambda v: fastvae.reparameterize(v.mu, v.logvar, generator=3), r"torch.Generator, got int$"),
    (lambda v: fastvae.set_validate_values(1), r"enabled must be a bool, got int$"),
    (lambda v: fastvae.elbo_loss(v.x, v.x_hat, v.mu, v.logvar, beta="1"),
     r"beta must be a real number, got str$"),
], ids=["seed", "n_samples", "generator", "validate_values", "beta"])
def test_type_errors_name_the_type_given(call, message):
    with pytest.raises(TypeError, match=message):
        call(valid())


def test_seed_range_boundaries(backend):
    """[0, 2**63): both ends are accepted, 2**63 is refused."""
    v = valid()
    for seed in (0, 2**63 - 1):
        fastvae.reparameterize(v.mu, v.logvar, seed=seed)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"):
        fastvae.reparameterize(v.mu, v.logvar, seed=2**63)


@pytest.mark.parametrize("keyword, likelihood", [("sigma", "gaussian"), ("scale", "laplace")])
def test_a_scale_tensor_with_one_zero_is_refused(backend, keyword, likelihood):
    """> 0 everywhere: a single zero (not only negatives) is refused."""
    v = valid()
    scale = torch.ones(6)
    scale[4] = 0.0
    with pytest.raises(ValueError, match=rf"{keyword} must be > 0 everywhere"):
        fastvae.elbo_loss(v.x, v.x_hat, v.mu, v.logvar, likelihood=likelihood, **{keyword: scale})


@pytest.mark.parametrize("moved", ["mu", "logvar", "seed"])
def test_reparameterize_with_a_seed_tensor_checks_every_device(backend, moved):
    """With a seed tensor given, no argument takes its device from another: any one of the
    three elsewhere is refused."""
    v = valid()
    args = {"mu": v.mu, "logvar": v.logvar, "seed": torch.tensor(5)}
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError, match=rf"all tensors must be on one device.*{moved} on meta"):
        fastvae.reparameterize(args["mu"], args["logvar"], seed=args["seed"])


@pytest.mark.parametrize("call, names", [
    (lambda v: fastvae.elbo_loss(v.x, v.x_hat, v.mu, v.logvar, likelihood="poisson"),
     "ELBO_LIKELIHOODS"),  # the per-element likelihoods and 'categorical'
    (lambda v: fastvae.ELBOLoss(likelihood="poisson"), "LIKELIHOODS")],
    ids=["elbo_loss", "ELBOLoss"])
def test_bad_likelihood_lists_the_choices(backend, call, names):
    import re
    from fastvae import _validation
    choices = re.escape(str(list(getattr(_validation, names))))
    assert "'gaussian'" in choices and "'laplace'" in choices
    with pytest.raises(ValueError, match=rf"^likelihood must be one of {choices}, got 'poisson'$"):
        call(valid())


@pytest.mark.parametrize("call, message", [
    (lambda v: fastvae.gaussian_nll(torch.tensor(1.0), torch.tensor(1.0)),
     r"^x must be \[B, \*event\] with at least one dim, got a 0-dim tensor$"),
    (lambda v: fastvae.elbo_loss(v.x, torch.randn(4, 5), v.mu, v.logvar),
     r"^x_hat must have x's shape \(4, 6\) or \[S, 4, 6\], got \(4, 5\)$"),
    (lambda v: fastvae.elbo_loss(v.x, v.x_hat, v.mu, v.logvar, sigma=torch.ones(5)),
     r"^sigma of shape \(5,\) does not broadcast to x_hat of shape \(4, 6\)$"),
    (lambda v: fastvae.laplace_nll(v.x, v.x_hat, scale=torch.ones(2, 4, 6)),
     r"^scale of shape \(2, 4, 6\) does not broadcast to x_hat of shape \(4, 6\)$"),
    (lambda v: fastvae.elbo_loss(v.x, v.x_hat, v.mu, v.logvar, x_logvar=torch.zeros(5)),
     r"^x_logvar of shape \(5,\) does not broadcast to x_hat of shape \(4, 6\)$"),
    (lambda v: fastvae.gaussian_kl(v.mu, v.logvar, prior_mu=torch.zeros(2)),
     r"^prior_mu of shape \(2,\) does not broadcast to mu of shape \(4, 3\)$"),
    (lambda v: fastvae.elbo_loss(v.x, v.x_hat, v.mu, v.logvar, free_bits="a"),
     r"^free_bits must be a real number, got str$"),
], ids=["x 0-dim", "x_hat shape", "sigma shape", "scale shape", "x_logvar shape", "prior shape",
        "free_bits type"])
def test_shape_and_type_messages_in_full(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(valid())


@pytest.mark.parametrize("call, message", [
    (lambda v: fastvae.elbo_loss(v.x.tolist(), v.x_hat, v.mu, v.logvar),
     r"^x must be a torch.Tensor, got list$"),
    (lambda v: fastvae.gaussian_kl(v.mu, v.logvar.to("meta")),
     r"^all tensors must be on one device, got mu on cpu, logvar on meta$"),
], ids=["not a tensor", "devices"])
def test_messages_name_what_was_given(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call(valid())
