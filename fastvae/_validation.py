"""Argument checks of the public functions: every check runs before any kernel, and each is a
few attribute reads and comparisons, because they run on every call. Checks of the values
themselves read the data back (a device sync), so they run only in the value-checking mode."""
import contextlib
import math
import numbers

import torch

from ._common import Likelihood, Reduction

LIKELIHOODS = {member.name.lower(): member for member in Likelihood}
REDUCTIONS = {"none": Reduction.NONE, "mean": Reduction.MEAN, "sum": Reduction.SUM}
# The categorical likelihood is not a per-element Likelihood of the loss ops but an op of its
# own (fastvae.categorical): of the functions taking a likelihood, elbo_loss and iwae_loss
# take it.
CATEGORICAL = "categorical"
ELBO_LIKELIHOODS = {**LIKELIHOODS, CATEGORICAL: CATEGORICAL}
# Choices some functions refuse that others take: what the refusal adds.
_TAKEN_ELSEWHERE = {("likelihood", CATEGORICAL): "only elbo_loss and iwae_loss take likelihood "
                                                  "'categorical'; fastvae.categorical_nll "
                                                  "computes its NLL"}
# The class-index dtypes the categorical op reads as they are; other integer dtypes are widened.
CLASS_INDEX_DTYPES = (torch.int64, torch.uint8)


def check_float_tensor(name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")


def check_same_device(**tensors):
    device = None
    for value in tensors.values():
        if isinstance(value, torch.Tensor):
            if device is None:
                device = value.device
            elif value.device != device:
                listing = ", ".join(f"{name} on {t.device}" for name, t in tensors.items()
                                    if isinstance(t, torch.Tensor))
                raise ValueError(f"all tensors must be on one device, got {listing}")


def choice(name, value, choices):
    """``choices[value]``, or a ValueError listing the valid names."""
    try:
        return choices[value]
    except (KeyError, TypeError):
        note = _TAKEN_ELSEWHERE.get((name, value)) if isinstance(value, str) else None
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}"
                         + (f" ({note})" if note else "")) from None


def check_same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_broadcasts_to(name, value, shape, target_name):
    """``value`` must broadcast to ``shape`` without enlarging it."""
    own = value.shape
    fits = own == shape or len(own) <= len(shape) and all(
        size == 1 or size == target for size, target in zip(reversed(own), reversed(shape)))
    if not fits:
        raise ValueError(f"{name} of shape {tuple(own)} does not broadcast to "
                         f"{target_name} of shape {tuple(shape)}")


def check_real(name, value, minimum=None, strict=False):
    """A finite real number (every float option: β, the capacity, free bits, a constant
    scale), at least ``minimum`` (above it when ``strict``)."""
    # (a float is tested first: isinstance against the numbers ABCs is slow, and this runs on
    # every call)
    if type(value) is not float and (isinstance(value, bool)
                                     or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value}")


def check_beta(beta):
    if isinstance(beta, torch.Tensor):
        check_float_tensor("beta", beta)
        if beta.dim() != 0:
            raise ValueError(f"beta must be a float or a 0-dim tensor, got shape "
                             f"{tuple(beta.shape)}")
    else:
        check_real("beta", beta, minimum=0.0)


def check_capacity(capacity):
    """None, a finite real ≥ 0, or a 0-dim floating tensor that does not require grad."""
    if capacity is None:
        return
    if isinstance(capacity, torch.Tensor):
        check_float_tensor("capacity", capacity)
        if capacity.dim() != 0:
            raise ValueError(f"capacity must be a float or a 0-dim tensor, got shape "
                             f"{tuple(capacity.shape)}")
        if capacity.requires_grad:
            raise ValueError("capacity must not require grad: its gradient is not implemented "
                             "(pass capacity.detach())")
        return
    check_real("capacity", capacity, minimum=0.0)


def check_positive(name, value):
    """A float > 0, or a floating tensor (on CPU, also checked to be > 0 everywhere)."""
    if isinstance(value, torch.Tensor):
        check_float_tensor(name, value)
        if value.device.type == "cpu" and not torch.compiler.is_compiling() \
                and value.numel() and bool((value <= 0).any()):
            raise ValueError(f"{name} must be > 0 everywhere")
    else:
        check_real(name, value, minimum=0.0, strict=True)


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_seed(seed):
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.dim() != 0:
            raise TypeError(f"a tensor seed must be a 0-dim int64 tensor, got {seed.dtype} "
                            f"of shape {tuple(seed.shape)}")
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def check_count(name, value, optional=False):
    """An int ≥ 1 (or None where ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "an int or None" if optional else "an int"
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_data(x, x_hat, name_hat):
    check_float_tensor("x", x)
    check_float_tensor(name_hat, x_hat)
    if x.dim() < 1:
        raise ValueError("x must be [B, *event] with at least one dim, got a 0-dim tensor")
    if x_hat.shape != x.shape and x_hat.shape[1:] != x.shape:
        raise ValueError(f"{name_hat} must have x's shape {tuple(x.shape)} or [S, "
                         f"{', '.join(map(str, x.shape))}], got {tuple(x_hat.shape)}")


def check_class_target(target):
    """Class indices: an integer tensor with a batch dim (not bool, float or complex)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold class indices in an integer dtype (int64 or uint8 "
                        f"are read as they are), got {target.dtype}")
    if target.dim() < 1:
        raise ValueError("target must be [B, *event] with at least one dim, got a 0-dim tensor")


def check_latents(mu, logvar, prior_mu, prior_logvar):
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    check_same_shape("mu", mu, "logvar", logvar)
    if mu.dim() < 2:
        raise ValueError(f"mu must be [B, *latent] with at least 2 dims, got {tuple(mu.shape)}")
    for name, prior in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if prior is not None:
            check_float_tensor(name, prior)
            check_broadcasts_to(name, prior, mu.shape, "mu")


# ----------------------------------------------------------------------------------------------
# the value-checking mode
# ----------------------------------------------------------------------------------------------
_values_checked = False


def set_validate_values(enabled: bool) -> None:
    """Turn the value-checking mode on or off (off by default). When on, every call checks that
    its floating inputs are finite, that Bernoulli targets lie in [0, 1] and categorical ones in
    [0, K), raising a ValueError that names the argument and the first bad index. Each check
    reads the data back: on a GPU it synchronises, so use it to debug, not to train (like
    torch.distributions' ``validate_args`` or ``torch.autograd.set_detect_anomaly``). Skipped
    under torch.compile."""
    global _values_checked
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _values_checked = enabled


@contextlib.contextmanager
def validate_values(enabled: bool = True):
    """Context manager setting the value-checking mode for the calls inside it."""
    previous = _values_checked
    set_validate_values(enabled)
    try:
        yield
    finally:
        set_validate_values(previous)


def checking_values() -> bool:
    return _values_checked and not torch.compiler.is_compiling()


def _first_bad(name, tensor, bad, requirement):
    if bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name} must be {requirement}, got {tensor[index].item()} at index "
                         f"{index}")


def check_class_indices(target, classes):
    """In the value-checking mode: every class index of ``target`` within [0, classes)."""
    _first_bad("target", target, (target < 0) | (target >= classes),
               f"a class index in [0, {classes})")


def check_values(unit_interval=(), **tensors):
    """In the value-checking mode: every given tensor finite, those named in ``unit_interval``
    also within [0, 1]."""
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            _first_bad(name, tensor, ~torch.isfinite(tensor), "finite")
            if name in unit_interval:
                _first_bad(name, tensor, (tensor < 0) | (tensor > 1), "in [0, 1]")
