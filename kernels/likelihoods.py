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
=========  ===========================  ==============  ======  ===============
"""
import triton
import triton.language as tl

from .._common import LOG_2, LOG_2PI, Likelihood

GAUSSIAN = tl.constexpr(int(Likelihood.GAUSSIAN))
BERNOULLI = tl.constexpr(int(Likelihood.BERNOULLI))
LAPLACE = tl.constexpr(int(Likelihood.LAPLACE))
_LOG_2PI = tl.constexpr(LOG_2PI)
_LOG_2 = tl.constexpr(LOG_2)


def uses_log_scale(likelihood: int) -> bool:
    """Whether θ enters the likelihood (the launcher skips loading it otherwise)."""
    return likelihood != Likelihood.BERNOULLI


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
def terms(x, x_hat, theta, LIKELIHOOD: tl.constexpr):
    """``(nll, ∂x, ∂x̂, ∂θ)`` of every element, broadcast to the shape of ``x_hat``."""
    if LIKELIHOOD == BERNOULLI:
        return _bernoulli(x, x_hat)
    elif LIKELIHOOD == LAPLACE:
        return _laplace(x, x_hat, theta)
    else:
        return _gaussian(x, x_hat, theta)
