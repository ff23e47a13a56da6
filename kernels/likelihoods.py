"""Per-element maths of every decoder likelihood p(x | x̂, θ): the one Triton file a new
likelihood touches (besides ``fastvae._common.Likelihood``, which numbers it).

``terms(x, x_hat, theta, LIKELIHOOD)`` returns ``(nll, ∂x, ∂x̂, ∂θ)`` per element, with
r = x − x̂ and θ the log-scale (log σ² for the Gaussian, log b for the Laplace):

=========  ===========================  ==============  ======  ===============
likelihood nll                          ∂x              ∂x̂      ∂θ
=========  ===========================  ==============  ======  ===============
GAUSSIAN   ½(r²e^−θ + θ + log 2π)       r e^−θ          −∂x     ½(1 − r²e^−θ)
BERNOULLI  softplus(x̂) − x x̂ (logits)   −x̂              σ(x̂)−x  0 (θ unused)
LAPLACE    |r| e^−θ + θ + log 2         sign(r) e^−θ    −∂x     1 − |r| e^−θ
CONT. B.   (½ − x) x̂ + L(x̂) (logits)    −x̂              ½−x+D   0 (θ unused)
=========  ===========================  ==============  ======  ===============

The continuous Bernoulli's L(ℓ) = log(sinh(ℓ/2)/(ℓ/2)) and D(ℓ) = L'(ℓ) = ½coth(ℓ/2) − 1/ℓ
make its NLL softplus(ℓ) − x ℓ − log C(ℓ), C(ℓ) = ℓ/tanh(ℓ/2); below |ℓ| = CB_SWITCH they come
from their Taylor series, above it from closed forms (see ``fastvae._common``).
"""
import torch
import triton
import triton.language as tl

from .._common import (CB_LOG_SERIES, CB_SERIES, CB_SWITCH, CB_TERMS, LOG_2, LOG_2PI,
                       Likelihood)

GAUSSIAN = tl.constexpr(int(Likelihood.GAUSSIAN))
BERNOULLI = tl.constexpr(int(Likelihood.BERNOULLI))
LAPLACE = tl.constexpr(int(Likelihood.LAPLACE))
CONTINUOUS_BERNOULLI = tl.constexpr(int(Likelihood.CONTINUOUS_BERNOULLI))
_LOG_2PI = tl.constexpr(LOG_2PI)
_LOG_2 = tl.constexpr(LOG_2)
_CB_SWITCH = tl.constexpr(CB_SWITCH)
_CB_SERIES = tl.constexpr(CB_SERIES)
_CB_LOG_SERIES = tl.constexpr(CB_LOG_SERIES)
_CB_TERMS_FLOAT32 = tl.constexpr(CB_TERMS[torch.float32])
_CB_TERMS_FLOAT64 = tl.constexpr(CB_TERMS[torch.float64])


@triton.jit
def _log1p(t):
    """log(1 + t), accurate for small t without libdevice: log(u)·t/(u−1) with u = 1 + t."""
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _gaussian(x, x_hat, theta):
    residual = x - x_hat
    d_x = residual * tl.exp(-theta)
    scaled_square = residual * d_x
    return 0.5 * (scaled_square + theta + _LOG_2PI), d_x, -d_x, 0.5 * (1.0 - scaled_square)


@triton.jit
def _bernoulli(x, x_hat):
    # softplus(x̂) = max(x̂, 0) + log1p(e^−|x̂|): no overflow for large |x̂|.
    decay = tl.exp(-tl.abs(x_hat))
    nll = tl.maximum(x_hat, 0.0) + _log1p(decay) - x * x_hat
    sigmoid = tl.where(x_hat >= 0.0, 1.0 / (1.0 + decay), decay / (1.0 + decay))
    return nll, -x_hat, sigmoid - x, tl.zeros_like(nll)


@triton.jit
def _laplace(x, x_hat, theta):
    residual = x - x_hat
    inverse_scale = tl.exp(-theta)
    scaled_distance = tl.abs(residual) * inverse_scale
    sign = tl.where(residual > 0.0, 1.0, tl.where(residual < 0.0, -1.0, 0.0))
    d_x = sign * inverse_scale
    return scaled_distance + theta + _LOG_2, d_x, -d_x, 1.0 - scaled_distance


@triton.jit
def _horner(square, COEFFICIENTS: tl.constexpr, TERMS: tl.constexpr):
    """Σ_{k < TERMS} COEFFICIENTS[k]·square^k."""
    total = tl.full(square.shape, COEFFICIENTS[TERMS - 1], square.dtype)
    for k in tl.static_range(TERMS - 2, -1, -1):
        total = total * square + COEFFICIENTS[k]
    return total


@triton.jit
def _continuous_bernoulli(x, x_hat):
    # (½ − x)ℓ + L(ℓ), ∂ℓ = ½ − x + D(ℓ): the series below the switch, above it with a = |ℓ|
    # and e = e^−a, L = a/2 − log a + log1p(−e), D = sign(ℓ)((½ − 1/a) + e/(1 − e)). Each
    # branch gets its argument clamped into its range, so the unused one stays finite.
    if x_hat.dtype == tl.float64:
        TERMS: tl.constexpr = _CB_TERMS_FLOAT64
    else:
        TERMS: tl.constexpr = _CB_TERMS_FLOAT32
    size = tl.abs(x_hat)
    inner = tl.minimum(tl.maximum(x_hat, -_CB_SWITCH, propagate_nan=tl.PropagateNan.ALL),
                       _CB_SWITCH, propagate_nan=tl.PropagateNan.ALL)
    square = inner * inner
    outer = tl.maximum(size, _CB_SWITCH, propagate_nan=tl.PropagateNan.ALL)
    decay = tl.exp(-outer)
    near = size < _CB_SWITCH
    log_ratio = tl.where(near, square * _horner(square, _CB_LOG_SERIES, TERMS),
                         0.5 * outer - tl.log(outer) + _log1p(-decay))
    sign = tl.where(x_hat > 0.0, 1.0, tl.where(x_hat < 0.0, -1.0, 0.0))
    langevin = tl.where(near, inner * _horner(square, _CB_SERIES, TERMS),
                        sign * ((0.5 - 1.0 / outer) + decay / (1.0 - decay)))
    half_minus_x = 0.5 - x
    return (half_minus_x * x_hat + log_ratio, -x_hat, half_minus_x + langevin,
            tl.zeros_like(x_hat))


@triton.jit
def terms(x, x_hat, theta, LIKELIHOOD: tl.constexpr):
    """``(nll, ∂x, ∂x̂, ∂θ)`` of every element, broadcast to the shape of ``x_hat``."""
    if LIKELIHOOD == BERNOULLI:
        return _bernoulli(x, x_hat)
    elif LIKELIHOOD == LAPLACE:
        return _laplace(x, x_hat, theta)
    elif LIKELIHOOD == CONTINUOUS_BERNOULLI:
        return _continuous_bernoulli(x, x_hat)
    else:
        return _gaussian(x, x_hat, theta)
