"""Argument checks shared by the public functions. Every check runs before any kernel."""
import numbers

import torch

LIKELIHOODS = ("gaussian", "bernoulli")
REDUCTIONS = ("none", "mean", "sum")


def check_float_tensor(name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or "
                        f"float64), got {value.dtype}")


def check_same_device(**tensors):
    present = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_same_shape(name_a, a, name_b, b):
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_broadcasts_to(name, value, shape, target_name):
    """``value`` must broadcast to ``shape`` without enlarging it."""
    try:
        ok = torch.broadcast_shapes(value.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {tuple(value.shape)} does not broadcast to "
                         f"{target_name} of shape {tuple(shape)}")


def check_real(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be {relation} {minimum}, got {value}")


def check_beta(beta):
    if isinstance(beta, torch.Tensor):
        check_float_tensor("beta", beta)
        if beta.dim() != 0:
            raise ValueError(f"beta must be a float or a 0-dim tensor, got shape {tuple(beta.shape)}")
    else:
        check_real("beta", beta, minimum=0.0)


def check_sigma(sigma):
    if isinstance(sigma, torch.Tensor):
        check_float_tensor("sigma", sigma)
        if sigma.device.type == "cpu" and not torch.compiler.is_compiling() \
                and sigma.numel() and bool((sigma <= 0).any()):
            raise ValueError("sigma must be > 0 everywhere")
    else:
        check_real("sigma", sigma, minimum=0.0, strict=True)


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
