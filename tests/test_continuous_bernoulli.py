"""The continuous Bernoulli likelihood on logits ℓ (Loaiza-Ganem & Cunningham 2019), on every
backend: its NLL and gradients against torch.distributions.ContinuousBernoulli and against a
60-digit evaluation of our own, near λ = ½ (ℓ → 0), at the series/closed-form switch and out to
large |ℓ|, in float64 and float32.

With L(ℓ) = log(sinh(ℓ/2)/(ℓ/2)) and D(ℓ) = L'(ℓ) = ½coth(ℓ/2) − 1/ℓ:
    NLL = softplus(ℓ) − x·ℓ − log C(ℓ), C(ℓ) = ℓ/tanh(ℓ/2)  =  (½ − x)·ℓ + L(ℓ)
    ∂NLL/∂ℓ = σ(ℓ) − x − (1/ℓ − 1/sinh ℓ)  =  ½ − x + D(ℓ),   ∂NLL/∂x = −ℓ.

torch.distributions is itself inaccurate in float64 in two places (measured against the 60-digit
values): near λ = ½ just outside its own Taylor window |λ − ½| < 10⁻³ (|ℓ| ≳ 0.004, relative
errors up to ~5·10⁻⁹ from the cancellation in log atanh(1 − 2λ) − log(1 − 2λ)), and at large
positive ℓ (absolute errors growing like eps·e^ℓ/64, 3·10⁻⁵ at ℓ = 30, from rounding λ = σ(ℓ)
next to 1). The comparison with torch allows for exactly that; the tight accuracy checks use the
60-digit evaluation (``decimal``, no mpmath), which is exact to far below an ulp everywhere.
"""
import decimal
import math

import pytest
import torch
from torch import distributions as dist

import fastvae
import oracle
from cases import TEST_DEVICE, build, cast, differentiable, generator, pick
from fastvae._common import CB_SWITCH

F32, F64 = torch.float32, torch.float64
XS = (0.0, 0.25, 0.5, 0.75, 1.0)  # x = ½ makes the NLL L(ℓ) and the gradient D(ℓ) alone


def _ulps_around(value, count, dtype):
    """``value`` and its ``count`` neighbours on each side in ``dtype``."""
    out, down, up = [value], torch.tensor(value, dtype=dtype), torch.tensor(value, dtype=dtype)
    for _ in range(count):
        down = torch.nextafter(down, torch.tensor(-math.inf, dtype=dtype))
        up = torch.nextafter(up, torch.tensor(math.inf, dtype=dtype))
        out += [down.item(), up.item()]
    return out


def logits_grid(dtype):
    """ℓ in [−30, 30]: a uniform grid, decades down to 10⁻⁸ near 0, and the switch ± 4 ulps."""
    points = torch.linspace(-30.0, 30.0, 241, dtype=F64).tolist()
    decades = torch.logspace(-8, 0.5, 39, dtype=F64).tolist() + [1e-4, 1e-2, 4e-3, 4.1e-3]
    points += decades + [-d for d in decades] + [0.0]
    points += _ulps_around(CB_SWITCH, 4, dtype) + _ulps_around(-CB_SWITCH, 4, dtype)
    return torch.tensor(points, dtype=F64).to(dtype)


def exact(logits, x):
    """(NLL, ∂NLL/∂ℓ) per element from 60-digit decimal arithmetic, rounded to float64."""
    nll, grad = [], []
    with decimal.localcontext() as context:
        context.prec = 60
        half = decimal.Decimal(1) / 2
        for logit, target in zip(logits.double().tolist(), x.double().tolist()):
            ell, t = decimal.Decimal(logit), decimal.Decimal(target)
            log_ratio, langevin = decimal.Decimal(0), decimal.Decimal(0)
            if ell != 0:
                grow, decay = (ell / 2).exp(), (-ell / 2).exp()
                sinh, cosh = (grow - decay) / 2, (grow + decay) / 2
                log_ratio = (sinh / (ell / 2)).ln()
                langevin = cosh / sinh / 2 - 1 / ell
            nll.append(float((half - t) * ell + log_ratio))
            grad.append(float(half - t + langevin))
    return torch.tensor(nll, dtype=F64), torch.tensor(grad, dtype=F64)


def per_element(x, logits):
    """fastvae's per-element NLL, ∂ℓ and ∂x: rows of one element, with latents whose KL is 0."""
    x = x.detach().to(TEST_DEVICE).view(-1, 1).requires_grad_()
    logits = logits.detach().to(TEST_DEVICE).view(-1, 1).requires_grad_()
    zeros = torch.zeros_like(logits)
    nll = fastvae.elbo_loss(x, logits, zeros, zeros, likelihood="continuous_bernoulli",
                            reduction="none")
    grad_logits, grad_x = torch.autograd.grad(nll.sum(), (logits, x))
    return [t.detach().cpu().view(-1) for t in (nll, grad_logits, grad_x)]


def torch_per_element(x, logits):
    """torch.distributions' −log_prob, its gradients over ℓ and x (autograd), on the CPU."""
    x = x.detach().cpu().clone().requires_grad_()
    logits = logits.detach().cpu().clone().requires_grad_()
    nll = -dist.ContinuousBernoulli(logits=logits, validate_args=False).log_prob(x)
    grad_logits, grad_x = torch.autograd.grad(nll.sum(), (logits, x))
    return nll.detach(), grad_logits, grad_x


def grid(dtype):
    """Every grid logit against every x in XS, flattened."""
    logits = logits_grid(dtype)
    x = torch.tensor(XS, dtype=dtype)
    return x.repeat_interleave(logits.numel()), logits.repeat(len(XS))


def scales(x, logits, want_nll, want_grad):
    """The size of the terms each value sums, against which an error is measured: |(½ − x)ℓ|
    + |L(ℓ)| for the NLL, |½ − x| + |D(ℓ)| for ∂ℓ."""
    half_minus_x = 0.5 - x.double()
    linear = half_minus_x * logits.double()
    return (linear.abs() + (want_nll - linear).abs(),
            half_minus_x.abs() + (want_grad - half_minus_x).abs())


def ulps(got, want, scale, dtype):
    """The largest error in ulps of ``scale`` (exactness where the scale is 0: ℓ = 0, x = ½)."""
    unit = scale.clamp_min(torch.finfo(F64).tiny) * torch.finfo(dtype).eps
    return ((got.double() - want).abs() / unit).max().item()


def test_float64_matches_torch_distributions(backend):
    x, logits = grid(F64)
    nll, grad_logits, grad_x = per_element(x, logits)
    want_nll, want_grad, want_grad_x = torch_per_element(x, logits)
    nll_scale, grad_scale = scales(x, logits, *exact(logits, x))
    # torch's own float64 error (module docstring; measured at most 1.8e-14 (NLL) and 4.2e-12
    # (∂ℓ) near λ = ½ and half of eps·e^ℓ/16 at large ℓ), on top of a few ulps of the terms.
    large = torch.finfo(F64).eps * torch.exp(logits) / 16
    assert ((nll - want_nll).abs() <= 5e-14 + 1e-14 * nll_scale + large).all()
    assert ((grad_logits - want_grad).abs() <= 1e-11 + 1e-14 * grad_scale + large).all()
    assert torch.equal(grad_x, want_grad_x)


@pytest.mark.parametrize("dtype, bound", [(F64, 4.0), (F32, 8.0)])
def test_accuracy_against_60_digits(backend, dtype, bound):
    """Within a few ulps of the sizes of the terms, over [−30, 30], through the switch and down
    to ℓ = 10⁻⁸, where torch loses everything in float64 at x = ½ (its NLL there is the
    difference of two values near log 2)."""
    x, logits = grid(dtype)
    nll, grad_logits, grad_x = per_element(x, logits)
    want_nll, want_grad = exact(logits, x)
    nll_scale, grad_scale = scales(x, logits, want_nll, want_grad)
    assert ulps(nll, want_nll, nll_scale, dtype) <= bound
    assert ulps(grad_logits, want_grad, grad_scale, dtype) <= bound
    assert torch.equal(grad_x, -logits)


@pytest.mark.parametrize("region", ["near_zero", "large"])
def test_float32_no_worse_than_torch(backend, region):
    """float32 against the exact values at the float32 inputs: fastvae's largest error is at most
    twice torch's own float32 error, and within 8 ulps of the term sizes. (torch's float32 is
    far off both near λ = ½ and for |ℓ| ≳ 17, where it clamps λ to [eps, 1 − eps].)"""
    if region == "near_zero":
        magnitudes = torch.logspace(-8, 0.5, 60, dtype=F64)
    else:
        magnitudes = torch.linspace(4.0, 30.0, 60, dtype=F64)
    logits = torch.cat([magnitudes, -magnitudes]).to(F32)
    x = torch.rand(logits.shape, dtype=F64).to(F32)
    nll, grad_logits, _ = per_element(x, logits)
    torch_nll, torch_grad, _ = torch_per_element(x, logits)
    want_nll, want_grad = exact(logits, x)
    for got, theirs, want in ((nll, torch_nll, want_nll), (grad_logits, torch_grad, want_grad)):
        ours = (got.double() - want).abs().max()
        assert ours <= 2 * (theirs.double() - want).abs().max()
    nll_scale, grad_scale = scales(x, logits, want_nll, want_grad)
    assert ulps(nll, want_nll, nll_scale, F32) <= 8.0
    assert ulps(grad_logits, want_grad, grad_scale, F32) <= 8.0


@pytest.mark.parametrize("dtype, magnitude", [(F32, 1e4), (F32, 1e30), (F64, 1e300)])
def test_huge_logits_stay_finite(backend, dtype, magnitude):
    """sinh, tanh and e^|ℓ| are never formed: NLL = (½ − x)ℓ + |ℓ|/2 − log|ℓ|, ∂ℓ = ½ − x ±
    (½ − 1/|ℓ|) up to terms below e^−200."""
    logits = torch.tensor([magnitude, -magnitude, 200.0, -200.0], dtype=dtype)
    x = torch.tensor([1.0, 0.0, 0.25, 0.75], dtype=dtype)
    nll, grad_logits, _ = per_element(x, logits)
    assert torch.isfinite(nll).all() and torch.isfinite(grad_logits).all()
    ell, t = logits.double(), x.double()
    want_nll = (0.5 - t) * ell + ell.abs() / 2 - torch.log(ell.abs())
    want_grad = 0.5 - t + torch.sign(ell) * (0.5 - 1.0 / ell.abs())
    nll_scale, grad_scale = scales(x, logits, want_nll, want_grad)
    assert ulps(nll, want_nll, nll_scale, dtype) <= 4.0
    assert ulps(grad_logits, want_grad, grad_scale, dtype) <= 4.0


def test_uniform_at_zero_logit(backend):
    """λ = ½ is the uniform density on [0, 1]: NLL 0 and ∂ℓ = ½ − x exactly."""
    x = torch.tensor(XS, dtype=F64)
    nll, grad_logits, grad_x = per_element(x, torch.zeros_like(x))
    assert torch.equal(nll, torch.zeros_like(x))
    assert torch.equal(grad_logits, 0.5 - x)
    assert torch.equal(grad_x, torch.zeros_like(x))


def test_gradcheck(backend):
    """Autograd's numerical gradient in float64, with logits near 0, near the switch and far."""
    x = torch.rand(4, 6, dtype=F64, device=TEST_DEVICE).requires_grad_()
    logits = torch.tensor([0.0, 1e-3, -0.3, 1.9, -2.1, 8.0], dtype=F64, device=TEST_DEVICE)
    logits = (logits + 0.2 * torch.randn(3, 4, 6, dtype=F64, device=TEST_DEVICE))
    mu = torch.randn(4, 3, dtype=F64, device=TEST_DEVICE).requires_grad_()
    logvar = (0.5 * torch.randn(4, 3, dtype=F64, device=TEST_DEVICE)).requires_grad_()

    def loss(x, logits, mu, logvar):
        return fastvae.elbo_loss(x, logits, mu, logvar, likelihood="continuous_bernoulli",
                                 reduction="sum")
    assert torch.autograd.gradcheck(loss, (x, logits.requires_grad_(), mu, logvar))


def _values_and_grads(fn, args, kwargs, upstream):
    loss = fn(*args, **kwargs, reduction="none")
    loss = loss[0] if isinstance(loss, tuple) else loss
    return loss, torch.autograd.grad(loss, [t for _, t in differentiable(args, kwargs)], upstream)


def _max_error(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", pick("continuous_bernoulli", "continuous_bernoulli_samples"),
                         ids=str)
def test_low_precision_no_worse_than_pytorch(backend, case, dtype):
    """The shared cases in low precision, as tests/test_elbo.py checks the other likelihoods:
    error against float64 no worse than twice PyTorch's own in the same dtype."""
    args64, kwargs64 = build(case, generator=generator(9))
    args, kwargs = cast(args64, kwargs64, dtype)
    upstream = torch.randn(args64[0].shape[0], generator=generator(4), dtype=F64)
    want, want_grads = _values_and_grads(oracle.elbo_loss, args64, kwargs64, upstream)
    theirs, their_grads = _values_and_grads(oracle.elbo_loss, args, kwargs, upstream.to(dtype))
    got, got_grads = _values_and_grads(fastvae.elbo_loss, args, kwargs, upstream.float())
    floor = {F32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    assert _max_error(got, want) <= 2 * _max_error(theirs, want) + floor * max(
        want.abs().max().item(), 1.0)
    for (name, t), g, g_torch, g_want in zip(differentiable(args, kwargs), got_grads,
                                             their_grads, want_grads):
        assert g.dtype == t.dtype, name
        scale = max(g_want.abs().max().item(), 1.0)
        assert _max_error(g, g_want) <= 2 * _max_error(g_torch, g_want) + floor * scale, name


def test_public_function_matches_the_loss_without_kl(backend):
    """continuous_bernoulli_nll is elbo_loss's NLL term, against torch.distributions."""
    g = generator(21)
    x = torch.rand(4, 3, 2, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    logits = (torch.randn(4, 3, 2, generator=g, dtype=torch.float64, device=TEST_DEVICE) * 3)
    want = -torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum((1, 2))
    torch.testing.assert_close(fastvae.continuous_bernoulli_nll(x, logits), want,
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fastvae.continuous_bernoulli_nll(x, logits, reduction="sum"),
                               want.sum(), rtol=1e-10, atol=1e-10)
