"""Rules shared by the op layer and every backend: the op's enums and slot names, the
accumulation dtype, the row reduction and the constants. Each lives here and nowhere else in
Python. The C++ copies: csrc/likelihoods.h (Likelihood, log 2π, log 2, the continuous Bernoulli's
switch point and series) and csrc/elbo_args.h (Reduction, the gradient slots, the accumulation
dtype)."""
import enum
import math
from fractions import Fraction

import torch

LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


class Likelihood(enum.IntEnum):
    """The decoder distribution p(x | x̂, θ); the op takes its value as an int."""
    GAUSSIAN = 0   # x̂ the mean, θ = log σ²
    BERNOULLI = 1  # x̂ the logits, no θ
    LAPLACE = 2    # x̂ the location, θ = log b
    CONTINUOUS_BERNOULLI = 3  # x̂ the logits, no θ


def _series_coefficients(count):
    """c_n = B_2n/(2n)! for n = 1..count (B the Bernoulli numbers, B_1 = −½), exactly: the
    Taylor coefficients of (ℓ/2)·coth(ℓ/2) = 1 + Σ c_n ℓ^2n, radius of convergence 2π."""
    bernoulli = [Fraction(1)]
    for m in range(1, 2 * count + 1):
        bernoulli.append(-sum(math.comb(m + 1, k) * bernoulli[k] for k in range(m)) / (m + 1))
    return tuple(bernoulli[2 * n] / math.factorial(2 * n) for n in range(1, count + 1))


# The continuous Bernoulli on logits ℓ, with L(ℓ) = log(sinh(ℓ/2)/(ℓ/2)) and D(ℓ) = L'(ℓ) =
# ½coth(ℓ/2) − 1/ℓ: below |ℓ| = CB_SWITCH the backends sum the series D = Σ c_n ℓ^(2n−1) and
# L = Σ c_n/(2n) ℓ^2n, with the first CB_TERMS[dtype] terms (truncation below half an ulp at
# the switch), above it the closed forms (within ~2 ulps from the switch on).
CB_SWITCH = 2.0
CB_TERMS = {torch.float32: 8, torch.float64: 16}
CB_SERIES = tuple(float(c) for c in _series_coefficients(16))  # c_n, for D
CB_LOG_SERIES = tuple(float(c / (2 * n)) for n, c in enumerate(_series_coefficients(16), 1))


class Reduction(enum.IntEnum):
    """How the per-datapoint losses are reduced; the op takes its value as an int."""
    NONE = 0
    MEAN = 1
    SUM = 2


# The loss op's differentiable inputs, in order: op input i has gradient slot i.
INPUTS = ("x", "x_hat", "x_log_scale", "mu", "logvar", "prior_mu", "prior_logvar")
# The same for the importance-weighted bound op.
IWAE_INPUTS = ("x", "x_hat", "x_log_scale", "z", "mu", "logvar", "prior_mu", "prior_logvar",
               "log_weight_offset")
# The datapoint dim of each loss op input and of its gradient (negative: from the end). Every
# ELBO input has it second-last (x [B, D], x_hat [(S,) B, D], θ right-aligned to x_hat, the
# latents [B, d]; a θ of fewer dims has none), and so does every bound input but the log-weight
# offset [S, B], which has it last; the categorical logits [S, B, ...] have it at dim 1. The C++
# copy: csrc/autograd.cpp's registration.
ROW_DIMS = (-2,) * len(INPUTS)
IWAE_ROW_DIMS = (-2,) * (len(IWAE_INPUTS) - 1) + (-1,)
CATEGORICAL_ROW_DIMS = (1,)


def sample_shape(shape, n_samples: int) -> tuple:
    """The shape of the sampling op's ``z`` for ``mu`` of ``shape``: the samples stacked along
    dim 0, ``[n_samples * B, *rest]`` for ``[B, *rest]`` (so one sample has ``mu``'s shape),
    ``[n_samples]`` for a 0-dim ``mu``. Its flat order is sample-major (element s*K + k)."""
    return (n_samples * shape[0], *shape[1:]) if len(shape) else (n_samples,)


def decoder_views(x_hat: torch.Tensor, x_log_scale):
    """The loss op's decoder tensors as its Python backends compute on them: ``x_hat`` as
    ``[S, B, D]`` (the op also takes ``[B, D]``, one sample) and θ as ``[Sl, Bl, Dl]`` (the op
    takes it with at most ``x_hat``'s dims, right-aligned). The C++ copy: csrc/elbo_args.cpp's
    decoder_views."""
    if x_hat.dim() == 2:
        x_hat = x_hat.unsqueeze(0)
    if x_log_scale is not None and x_log_scale.dim() < 3:
        x_log_scale = x_log_scale.view((1,) * (3 - x_log_scale.dim()) + tuple(x_log_scale.shape))
    return x_hat, x_log_scale


def in_given_shapes(grads, given, needs_grad) -> list:
    """Each wanted gradient in the shape of its input as the op was given it (undoing
    :func:`decoder_views`); the others as they are. Only a gradient whose shape differs gets a
    new tensor object: on the Triton path each costs host time per call."""
    return [grad.reshape(tensor.shape) if need and grad.shape != tensor.shape else grad
            for grad, tensor, need in zip(grads, given, needs_grad)]


def accumulation_dtype(*tensors) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (None entries are skipped)."""
    for tensor in tensors:
        if tensor is not None and tensor.dtype == torch.float64:
            return torch.float64
    return torch.float32


def reduce_rows(rows: torch.Tensor, reduction: int) -> torch.Tensor:
    """Per-datapoint values ``[B]`` reduced as ``reduction`` (a :class:`Reduction`) says."""
    if reduction == Reduction.NONE:
        return rows
    return rows.sum() if reduction == Reduction.SUM else rows.mean()
