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
