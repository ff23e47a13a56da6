"""The value-checking mode: off by default (no reads of the data), on it names the argument and
the first bad index of a non-finite input or a Bernoulli target outside [0, 1]."""
import pytest
import torch

import fastvae
from fastvae import _validation
from cases import TEST_DEVICE, generator


def _inputs():
    g = generator(3)
    x = torch.rand(3, 4, generator=g, device=TEST_DEVICE)
    x_hat, x_logvar = (torch.randn(3, 4, generator=g, device=TEST_DEVICE) for _ in range(2))
    mu, logvar = (torch.randn(3, 2, generator=g, device=TEST_DEVICE) for _ in range(2))
    return dict(x=x, x_hat=x_hat, mu=mu, logvar=logvar, x_logvar=x_logvar)


def _call(args):
    return fastvae.elbo_loss(args["x"], args["x_hat"], args["mu"], args["logvar"],
                             x_logvar=args["x_logvar"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["x", "x_hat", "mu", "logvar", "x_logvar"])
def test_non_finite_input_named_with_its_index(backend, name, bad):
    args = _inputs()
    args[name][1, 0] = bad
    with fastvae.validate_values():
        with pytest.raises(ValueError, match=rf"{name} must be finite, got .* at index \(1, 0\)"):
            _call(args)


def test_bernoulli_targets_outside_unit_interval(backend):
    args = _inputs()
    x = args["x"].clone()
    x[2, 3] = 1.25
    with fastvae.validate_values():
        with pytest.raises(ValueError, match=r"x must be in \[0, 1\], got 1.25 at index \(2, 3\)"):
            fastvae.elbo_loss(x, args["x_hat"], args["mu"], args["logvar"], likelihood="bernoulli")
        with pytest.raises(ValueError, match=r"x must be in \[0, 1\]"):
            fastvae.bernoulli_nll(x, args["x_hat"])
        # The Gaussian has no such range.
        fastvae.gaussian_nll(x, args["x_hat"])


@pytest.mark.parametrize("function", ["reparameterize", "gaussian_kl", "gaussian_nll",
                                      "laplace_nll"])
def test_every_function_checks(backend, function):
    args = _inputs()
    args["logvar"][0, 1] = float("nan")
    args["x_hat"][0, 1] = float("nan")
    call = {"reparameterize": lambda: fastvae.reparameterize(args["mu"], args["logvar"]),
            "gaussian_kl": lambda: fastvae.gaussian_kl(args["mu"], args["logvar"]),
            "gaussian_nll": lambda: fastvae.gaussian_nll(args["x"], args["x_hat"]),
            "laplace_nll": lambda: fastvae.laplace_nll(args["x"], args["x_hat"])}[function]
    with fastvae.validate_values():
        with pytest.raises(ValueError, match=r"must be finite, got nan at index \(0, 1\)"):
            call()


def test_valid_input_same_result_with_checks_on(backend):
    args = _inputs()
    plain = _call(args)
    with fastvae.validate_values():
        checked = _call(args)
    torch.testing.assert_close(checked, plain, rtol=0, atol=0)


def test_off_by_default_reads_no_values(backend, monkeypatch):
    """Off, a NaN passes through to the loss (as in PyTorch) and the checks never run."""
    def forbidden(*args, **kwargs):
        raise AssertionError("value checks ran with the mode off")
    monkeypatch.setattr(_validation, "check_values", forbidden)
    monkeypatch.setattr("fastvae.functional.check_values", forbidden)
    args = _inputs()
    args["x_hat"][0, 0] = float("nan")
    assert torch.isnan(_call(args))


def test_mode_is_restored_and_typed():
    assert not _validation.checking_values()
    with fastvae.validate_values():
        assert _validation.checking_values()
        with fastvae.validate_values(False):
            assert not _validation.checking_values()
        assert _validation.checking_values()
    assert not _validation.checking_values()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        fastvae.set_validate_values(1)


# Every floating argument of every function, with the call that takes it (from mutation
# testing: a check that leaves out one argument went unnoticed).
def _every_argument():
    g = generator(5)
    x = torch.rand(3, 4, generator=g, device=TEST_DEVICE)
    x_hat = torch.randn(3, 4, generator=g, device=TEST_DEVICE)
    mu, logvar = (torch.randn(3, 2, generator=g, device=TEST_DEVICE) for _ in range(2))
    ones4, zeros2 = torch.ones(4, device=TEST_DEVICE), torch.zeros(2, device=TEST_DEVICE)
    kl = dict(mu=mu, logvar=logvar, prior_mu=zeros2, prior_logvar=zeros2.clone())
    return {
        "elbo_loss": (lambda a: fastvae.elbo_loss(a["x"], a["x_hat"], a["mu"], a["logvar"],
                                                  **{k: a[k] for k in ("prior_mu", "prior_logvar",
                                                                       "x_logvar")}),
                      dict(x=x, x_hat=x_hat, x_logvar=ones4, **kl)),
        "elbo_loss sigma": (lambda a: fastvae.elbo_loss(a["x"], a["x_hat"], a["mu"], a["logvar"],
                                                        sigma=a["sigma"]),
                            dict(x=x, x_hat=x_hat, mu=mu, logvar=logvar, sigma=ones4)),
        "elbo_loss laplace": (lambda a: fastvae.elbo_loss(
            a["x"], a["x_hat"], a["mu"], a["logvar"], likelihood="laplace",
            x_logscale=a["x_logscale"]), dict(x=x, x_hat=x_hat, mu=mu, logvar=logvar, x_logscale=ones4)),
        "elbo_loss laplace scale": (lambda a: fastvae.elbo_loss(
            a["x"], a["x_hat"], a["mu"], a["logvar"], likelihood="laplace", scale=a["scale"]),
            dict(x=x, x_hat=x_hat, mu=mu, logvar=logvar, scale=ones4)),
        "elbo_loss beta": (lambda a: fastvae.elbo_loss(a["x"], a["x_hat"], a["mu"], a["logvar"],
                                                       beta=a["beta"]),
                           dict(x=x, x_hat=x_hat, mu=mu, logvar=logvar,
                                beta=torch.tensor(1.0, device=TEST_DEVICE))),
        "reparameterize": (lambda a: fastvae.reparameterize(a["mu"], a["logvar"]),
                           dict(mu=mu, logvar=logvar)),
        "gaussian_kl": (lambda a: fastvae.gaussian_kl(**a), kl),
        "gaussian_nll": (lambda a: fastvae.gaussian_nll(a["x"], a["mean"], a["logvar"]),
                         dict(x=x, mean=x_hat, logvar=ones4)),
        "gaussian_nll sigma": (lambda a: fastvae.gaussian_nll(a["x"], a["mean"], sigma=a["sigma"]),
                               dict(x=x, mean=x_hat, sigma=ones4)),
        "laplace_nll": (lambda a: fastvae.laplace_nll(a["x"], a["loc"], a["log_scale"]),
                        dict(x=x, loc=x_hat, log_scale=ones4)),
        "laplace_nll scale": (lambda a: fastvae.laplace_nll(a["x"], a["loc"], scale=a["scale"]),
                              dict(x=x, loc=x_hat, scale=ones4)),
        "bernoulli_nll": (lambda a: fastvae.bernoulli_nll(a["x"], a["logits"]),
                          dict(x=x, logits=x_hat)),
    }


EVERY_ARGUMENT = [(call, name) for call, (_, args) in _every_argument().items() for name in args]


@pytest.mark.parametrize("call, name", EVERY_ARGUMENT, ids=[f"{c} {n}" for c, n in EVERY_ARGUMENT])
def test_every_floating_argument_is_checked(backend, call, name):
    function, args = _every_argument()[call]
    args = {k: v.clone() for k, v in args.items()}
    args[name].view(-1)[-1] = float("nan")
    function(args)  # the mode is off: nothing is checked
    with fastvae.validate_values():
        with pytest.raises(ValueError, match=rf"^{name} must be finite, got nan"):
            function(args)


def test_bernoulli_targets_at_zero_and_one_are_valid(backend):
    """The interval is closed: exact 0 and 1 targets pass the check."""
    args = _inputs()
    x = torch.tensor([[0.0, 1.0, 0.5, 1.0]] * 3, device=TEST_DEVICE)
    with fastvae.validate_values():
        fastvae.elbo_loss(x, args["x_hat"], args["mu"], args["logvar"], likelihood="bernoulli")
        fastvae.bernoulli_nll(x, args["x_hat"])


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_only_bernoulli_targets_are_held_to_the_unit_interval(backend, likelihood):
    args = _inputs()
    x = args["x"] * 4 - 2
    with fastvae.validate_values():
        checked = fastvae.elbo_loss(x, args["x_hat"], args["mu"], args["logvar"],
                                    likelihood=likelihood)
    assert torch.isfinite(checked)
