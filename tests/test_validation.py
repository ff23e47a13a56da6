"""Every bad input of DESIGN.md §2 raises ValueError/TypeError naming what is wrong, before any
kernel runs."""
import os
import subprocess
import sys

import pytest
import torch

import fastvae
from fastvae import _backends

X = torch.randn(4, 6)
X_HAT = torch.randn(4, 6)
MU = torch.randn(4, 3)
LOGVAR = torch.randn(4, 3)


def elbo(**overrides):
    args = {"x": X, "x_hat": X_HAT, "mu": MU, "logvar": LOGVAR, **overrides}
    keywords = {k: v for k, v in args.items() if k not in ("x", "x_hat", "mu", "logvar")}
    return lambda: fastvae.elbo_loss(args["x"], args["x_hat"], args["mu"], args["logvar"], **keywords)


BAD_INPUTS = [
    ("x_hat shape", elbo(x_hat=torch.randn(4, 5)), ValueError, r"x_hat.*\(4, 6\).*\(4, 5\)"),
    ("sample dim shape", elbo(x_hat=torch.randn(2, 3, 6)), ValueError, r"x_hat"),
    ("mu batch", elbo(mu=torch.randn(5, 3), logvar=torch.randn(5, 3)), ValueError, r"mu.*B = 4"),
    ("mu vs logvar", elbo(logvar=torch.randn(4, 2)), ValueError, r"mu and logvar.*\(4, 3\).*\(4, 2\)"),
    ("mu 1-dim", elbo(mu=torch.randn(4), logvar=torch.randn(4)), ValueError, r"mu must be \[B, \*latent\]"),
    ("integer x", elbo(x=torch.ones(4, 6, dtype=torch.int64)), TypeError, r"x must have a floating dtype.*int64"),
    ("integer mu", elbo(mu=torch.ones(4, 3, dtype=torch.int32)), TypeError, r"mu must have a floating"),
    ("not a tensor", elbo(x_hat=[[1.0]]), TypeError, r"x_hat must be a torch.Tensor"),
    ("likelihood", elbo(likelihood="poisson"), ValueError, r"likelihood.*'poisson'"),
    ("reduction", elbo(reduction="batchmean"), ValueError, r"reduction.*'batchmean'"),
    ("free bits", elbo(free_bits=-0.1), ValueError, r"free_bits must be >= 0"),
    ("sigma zero", elbo(sigma=0.0), ValueError, r"sigma must be > 0"),
    ("sigma negative tensor", elbo(sigma=torch.tensor([-1.0] * 6)), ValueError, r"sigma must be > 0"),
    ("sigma and x_logvar", elbo(sigma=1.0, x_logvar=torch.zeros(6)), ValueError, r"either x_logvar or sigma"),
    ("bernoulli sigma", elbo(likelihood="bernoulli", sigma=1.0), ValueError, r"bernoulli"),
    ("bernoulli x_logvar", elbo(likelihood="bernoulli", x_logvar=torch.zeros(6)), ValueError, r"bernoulli"),
    ("x_logvar shape", elbo(x_logvar=torch.zeros(5)), ValueError, r"x_logvar of shape \(5,\).*x_hat"),
    ("x_logvar larger", elbo(x_logvar=torch.zeros(2, 4, 6)), ValueError, r"x_logvar"),
    ("prior shape", elbo(prior_mu=torch.zeros(2)), ValueError, r"prior_mu of shape \(2,\).*mu"),
    ("beta shape", elbo(beta=torch.ones(2)), ValueError, r"beta must be a float or a 0-dim"),
    ("beta negative", elbo(beta=-1.0), ValueError, r"beta must be >= 0"),
    ("beta string", elbo(beta="1"), TypeError, r"beta must be a real number"),
    ("free bits nan", elbo(free_bits=float("nan")), ValueError, r"free_bits must not be NaN"),
    ("mixed devices", elbo(mu=torch.randn(4, 3, device="meta"), logvar=torch.randn(4, 3, device="meta")),
     ValueError, r"one device.*mu on meta"),
    ("sample count", lambda: fastvae.reparameterize(MU, LOGVAR, 0), ValueError, r"n_samples must be >= 1"),
    ("sample type", lambda: fastvae.reparameterize(MU, LOGVAR, 2.0), TypeError, r"n_samples must be an int"),
    ("seed range", lambda: fastvae.reparameterize(MU, LOGVAR, seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ("seed type", lambda: fastvae.reparameterize(MU, LOGVAR, seed=1.5), TypeError, r"seed must be an int"),
    ("seed tensor", lambda: fastvae.reparameterize(MU, LOGVAR, seed=torch.tensor([1])), TypeError, r"0-dim int64"),
    ("generator", lambda: fastvae.reparameterize(MU, LOGVAR, generator=3), TypeError, r"generator"),
    ("sampling shapes", lambda: fastvae.reparameterize(MU, torch.randn(4, 2)), ValueError, r"mu and logvar"),
    ("kl 0-dim", lambda: fastvae.gaussian_kl(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"at least one dim"),
    ("kl prior", lambda: fastvae.gaussian_kl(MU, LOGVAR, prior_logvar=torch.zeros(4)), ValueError, r"prior_logvar"),
    ("nll reduction", lambda: fastvae.gaussian_nll(X, X_HAT, reduction="avg"), ValueError, r"reduction"),
    ("nll both", lambda: fastvae.gaussian_nll(X, X_HAT, torch.zeros(6), sigma=2.0), ValueError, r"not both"),
    ("nll x 0-dim", lambda: fastvae.gaussian_nll(torch.tensor(1.0), torch.tensor(1.0)), ValueError, r"x must be"),
    ("bernoulli shape", lambda: fastvae.bernoulli_nll(X, torch.randn(4, 7)), ValueError, r"logits"),
    ("module likelihood", lambda: fastvae.ELBOLoss(likelihood="laplace"), ValueError, r"likelihood"),
    ("module sigma", lambda: fastvae.ELBOLoss(sigma=-2.0), ValueError, r"sigma must be > 0"),
    ("backend name", lambda: fastvae.set_backend("cuda"), ValueError, r"unknown backend 'cuda'"),
]


@pytest.mark.parametrize("call, error, message", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_before_any_kernel(backend, monkeypatch, call, error, message):
    module = _backends.module(backend)

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    for name in ("elbo", "reparameterize_forward", "reparameterize_backward"):
        monkeypatch.setattr(module, name, no_kernel)
    with pytest.raises(error, match=message):
        call()


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


def test_reference_always_available():
    assert "reference" in fastvae.available_backends()
