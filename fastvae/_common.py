"""Rules shared by the op layer and every backend: the op's enums and slot names, the
accumulation dtype, the row reduction and the constants. Each lives here and nowhere else in
Python. The C++ copies: csrc/likelihoods.h (Likelihood, log 2π, log 2) and csrc/elbo_args.h
(Reduction, the gradient slots, the accumulation dtype)."""
import enum
import math

import torch

LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


class Likelihood(enum.IntEnum):
    """The decoder distribution p(x | x̂, θ); the op takes its value as an int."""
    GAUSSIAN = 0   # x̂ the mean, θ = log σ²
    BERNOULLI = 1  # x̂ the logits, no θ
    LAPLACE = 2    # x̂ the location, θ = log b


class Reduction(enum.IntEnum):
    """How the per-datapoint losses are reduced; the op takes its value as an int."""
    NONE = 0
    MEAN = 1
    SUM = 2


# The loss op's differentiable inputs, in order: op input i has gradient slot i.
INPUTS = ("x", "x_hat", "x_log_scale", "mu", "logvar", "prior_mu", "prior_logvar")


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
