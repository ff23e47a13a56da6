"""The public functional API (docs/design.md §2). All losses are in nats.

Each function validates its arguments, brings them to the normalised shapes the backends take
(see ``fastvae.backends.reference``) and calls one op. Shapes follow one rule: data is
``[B, *event]``, latents are ``[B, *latent]``, and sums run over all event or latent dims.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _ops
from ._common import ROW_DIMS, Likelihood, Reduction, accumulation_dtype, reduce_rows
from ._validation import (CATEGORICAL, ELBO_LIKELIHOODS, LIKELIHOODS, REDUCTIONS, check_beta,
                          check_broadcasts_to, check_capacity, check_count, check_data,
                          check_flag, check_float_tensor, check_latents, check_positive,
                          check_real, check_same_device, check_seed, check_values,
                          checking_values, choice)
from .categorical import categorical_outputs, check_categorical, check_categorical_values


class ELBOTerms(NamedTuple):
    """``loss`` (differentiable) and its detached parts ``nll`` and ``kl``, all reduced alike.

    ``kl`` is the analytic KL before free bits, so ``nll + kl`` is the −ELBO itself."""
    loss: Tensor
    nll: Tensor
    kl: Tensor


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _grouped(tensor: Tensor, shape, groups, full_rank: bool = True) -> Tensor:
    """``tensor`` (broadcastable to ``shape``) as a contiguous tensor with one dim per group of
    dims of ``shape``: size 1 where it is broadcast over the whole group, else the group's size.
    Without ``full_rank``, leading size-1 dims may be left out (the loss op broadcasts θ
    right-aligned), so a tensor already in that form needs no view. Without a broadcast inside
    a group this is at most one view (one autograd node, not four)."""
    if len(groups) == len(shape) and (tensor.dim() == len(shape) or not full_rank):
        return tensor.contiguous()  # one dim per group: it broadcasts as it is
    own = (1,) * (len(shape) - tensor.dim()) + tuple(tensor.shape)
    expanded, sizes, start = (), [], 0
    for count in groups:
        end = start + count
        mine = own[start:end]
        if mine.count(1) == count:  # broadcast along the whole group
            expanded += mine
            sizes.append(1)
        else:
            full = tuple(shape[start:end])
            expanded += full
            sizes.append(full[0] if count == 1 else math.prod(full))
        start = end
    if expanded != own:
        tensor = tensor.reshape(own).expand(expanded)
    dropped = len(sizes) - tensor.dim()
    if not full_rank and dropped >= 0 and sizes[:dropped].count(1) == dropped:
        sizes = sizes[dropped:]
    if tensor.shape != tuple(sizes):  # a view costs an autograd node (torch.Size is a tuple)
        tensor = tensor.reshape(sizes)
    return tensor.contiguous()


def _flattened(tensor: Tensor, lead: int) -> Tensor:
    """``tensor`` contiguous with its dims after the first ``lead`` merged into one."""
    if tensor.dim() != lead + 1:
        tensor = tensor.reshape(*tensor.shape[:lead], math.prod(tensor.shape[lead:]))
    return tensor.contiguous()


def _as(tensor: Tensor, dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _latent_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None and t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


_constants = {}  # (value, dtype, device) -> 0-dim tensor; bounded, see _constant


def _constant(value: float, dtype, device) -> Tensor:
    """A 0-dim tensor holding ``value``, cached so a float β costs no fill kernel per call.
    Not cached while tracing or while a CUDA graph is captured (its kernels do not run then)."""
    if torch.compiler.is_compiling() or (device.type == "cuda"
                                         and torch.cuda.is_current_stream_capturing()):
        return torch.full((), value, dtype=dtype, device=device)
    key = (value, dtype, device)
    found = _constants.get(key)
    if found is None:
        if len(_constants) >= 256:  # an annealed β must not grow the cache without bound
            _constants.clear()
        found = _constants[key] = torch.full((), value, dtype=dtype, device=device)
    return found


def _beta_tensor(beta, device, dtype) -> Tensor:
    """β (or the capacity C), a float or a 0-dim tensor, as a 0-dim tensor in the loss dtype."""
    if isinstance(beta, Tensor):
        return beta if beta.dtype == dtype and beta.device == device else beta.to(device, dtype)
    return _constant(float(beta), dtype, device)


def _decoder_scale(log_value, value, names, target_shape, from_value):
    """θ, the decoder's log-scale parameter: ``(tensor, 0.0)``, or ``(None, constant)``.

    ``log_value`` is θ itself, ``value`` the scale it is computed from by ``from_value`` (a
    float → float or tensor → tensor map); at most one of them is given."""
    log_name, name = names
    if log_value is not None and value is not None:
        raise ValueError(f"give either {log_name} or {name}, not both")
    if value is not None:
        check_positive(name, value)
        if not isinstance(value, Tensor):
            return None, from_value(value)
        check_broadcasts_to(name, value, target_shape, "x_hat")
        return from_value(value), 0.0
    if log_value is not None:
        check_float_tensor(log_name, log_value)
        check_broadcasts_to(log_name, log_value, target_shape, "x_hat")
    return log_value, 0.0


def _gaussian_theta(value):
    return 2.0 * (torch.log(value) if isinstance(value, Tensor) else math.log(value))


def _laplace_theta(value):
    return torch.log(value) if isinstance(value, Tensor) else math.log(value)


# Likelihoods with a θ: the elbo_loss keywords of θ itself and of the plain scale, and the map
# from that scale to θ.
_THETA_ARGUMENTS = {
    Likelihood.GAUSSIAN: ("x_logvar", "sigma", _gaussian_theta),
    Likelihood.LAPLACE: ("x_logscale", "scale", _laplace_theta),
}


def _theta(likelihood, scale_arguments, target_shape):
    """θ for ``likelihood`` from ``scale_arguments`` (keyword → value), refusing the scale
    arguments of every other likelihood."""
    own = _THETA_ARGUMENTS.get(likelihood, ())
    for name, value in scale_arguments.items():
        if value is not None and name not in own:
            raise ValueError(f"{name} does not belong to likelihood {likelihood.name.lower()!r}")
    if not own:
        return None, 0.0
    log_name, name, from_value = own
    return _decoder_scale(scale_arguments[log_name], scale_arguments[name], (log_name, name),
                          target_shape, from_value)


def _flat_latents(mu, logvar, prior_mu, prior_logvar, dtype):
    """``[B, L]`` latents in ``dtype``, and the priors as ``[1 or B, L]``."""
    mu2, logvar2 = _flattened(_as(mu, dtype), 1), _flattened(_as(logvar, dtype), 1)
    if prior_mu is None and prior_logvar is None:
        return mu2, logvar2, None, None
    zero = mu.new_zeros((), dtype=dtype)
    groups = (1, mu.dim() - 1)
    priors = [_grouped(_as(p if p is not None else zero, dtype), mu.shape, groups)
              for p in (prior_mu, prior_logvar)]
    # Both per datapoint if either is (a per-datapoint prior has B rows, also for B = 0 or 1).
    rows = 1 if all(p.shape[0] == 1 for p in priors) else mu2.shape[0]
    return (mu2, logvar2) + tuple(p.expand(rows, mu2.shape[1]).contiguous() for p in priors)


def _has_rows(tensor: Tensor, dim: int, batch: int) -> bool:
    """Whether ``tensor`` has one row per datapoint along ``dim`` (which it may lack)."""
    return -tensor.dim() <= dim < tensor.dim() and tensor.shape[dim] == batch


def _gradients_wanted(inputs, row_dims, reduction):
    """The op's ``needs_grad``: one bool per differentiable input (normalised: a view or copy
    requires grad exactly when its source does). With reduction 'none' a gradient can only be
    formed in forward for inputs with one row per datapoint (``row_dims`` names each input's
    datapoint dim). If another input wants one, the op recomputes every gradient in backward
    with the upstream gradient as row weights, so forward forms none."""
    if not torch.is_grad_enabled():
        return [False] * len(inputs)
    needs_grad = [t is not None and t.requires_grad for t in inputs]
    batch = inputs[0].shape[0]
    if reduction == Reduction.NONE and any(
            need and not _has_rows(t, dim, batch)
            for need, t, dim in zip(needs_grad, inputs, row_dims)):
        return [False] * len(inputs)
    return needs_grad


# Likelihoods whose data lies in [0, 1] (checked in the value-checking mode).
_UNIT_INTERVAL_DATA = (Likelihood.BERNOULLI, Likelihood.CONTINUOUS_BERNOULLI)


def _fused(x, x_hat, theta, theta_const, latents, beta, free_bits, likelihood, reduction,
           capacity=None, loss_only=False):
    """Normalise shapes and run the loss op. ``x_hat`` is ``x``'s shape or ``[S, *x.shape]``,
    ``latents`` the four tensors (mu, logvar, prior_mu, prior_logvar) as given. Returns the
    op's outputs, or with ``loss_only`` its loss alone (see ``_ops.elbo_loss``). The op takes
    one sample without its S dim and θ without its leading size-1 dims, so a 2-D call makes no
    view."""
    lead = x_hat.dim() - x.dim() + 1  # the dims before the event: (S,) B
    x2, x_hat2 = _flattened(x, 1), _flattened(x_hat, lead)
    theta2 = None if theta is None else _grouped(theta, x_hat.shape, (1,) * lead + (x.dim() - 1,),
                                                 full_rank=False)
    inputs = (x2, x_hat2, theta2) + _flat_latents(*latents, _latent_dtype(*latents))
    needs_grad = _gradients_wanted(inputs, ROW_DIMS, reduction)
    loss_dtype, device = accumulation_dtype(x, x_hat, theta, inputs[3]), x.device
    capacity = None if capacity is None else _beta_tensor(capacity, device, loss_dtype)
    run = _ops.elbo_loss if loss_only else _ops.elbo
    return run(*inputs, _beta_tensor(beta, device, loss_dtype), capacity, None, int(likelihood),
               float(theta_const), float(free_bits), int(reduction), needs_grad, device=device)


def _nll(x, x_hat, theta, theta_const, likelihood, reduction):
    latent = x.new_empty(x.shape[0], 0)
    return _fused(x, x_hat, theta, theta_const, (latent, latent, None, None), 1.0, 0.0,
                  likelihood, reduction, loss_only=True)


def _logits_nll(x, logits, likelihood, reduction):
    """The NLL of a likelihood on logits with data in [0, 1] (no θ): the Bernoulli ones."""
    check_data(x, logits, "logits")
    reduction = choice("reduction", reduction, REDUCTIONS)
    check_same_device(x=x, logits=logits)
    if checking_values():
        check_values(unit_interval=("x",), x=x, logits=logits)
    return _nll(x, logits, None, 0.0, likelihood, reduction)


class _KlOptions(NamedTuple):
    """elbo_loss's options of the KL term."""
    beta: object
    free_bits: float
    capacity: object
    prior: object  # a GaussianMixture, or None for the Gaussian prior of the latents
    z: Optional[Tensor]


def _check_kl_options(options: _KlOptions, prior_mu, prior_logvar):
    """The KL options' own checks; a mixture prior excludes a Gaussian one and free bits."""
    check_beta(options.beta)
    check_capacity(options.capacity)
    check_real("free_bits", options.free_bits, minimum=0.0)
    if options.prior is None:
        if options.z is not None:
            raise ValueError("z is only used with a mixture prior (prior=GaussianMixture(...))")
        return
    if prior_mu is not None or prior_logvar is not None:
        raise ValueError("give either a Gaussian prior (prior_mu, prior_logvar) or a mixture "
                         "prior (prior), not both")
    if options.z is None:
        raise ValueError("a mixture prior needs the sample z: its KL is estimated from it")
    if options.free_bits:
        raise ValueError("free_bits applies per latent dim; the KL to a mixture prior is not a "
                         "sum over latent dims")


def _kl_part(latents, options: _KlOptions, reduction, like):
    """The KL term on its own, ``reduce(β·KL term)``, and the ``[B]`` KL rows: from the loss op
    on an empty event (a Gaussian prior; its loss dtype follows ``like``) or from the mixture
    op (|KL − C| with a capacity)."""
    mu, logvar = latents[:2]
    if options.prior is not None:
        from . import mixture  # mixture.py builds on this module's helpers
        kl = mixture.mixture_kl(options.z, mu, logvar, options.prior)
        term = kl if options.capacity is None else (kl - options.capacity).abs()
        return reduce_rows(options.beta * term, reduction), kl
    empty = like.new_empty(mu.shape[0], 0)
    out = _fused(empty, empty, None, 0.0, latents, options.beta, options.free_bits,
                 Likelihood.GAUSSIAN, reduction, options.capacity)
    return out.loss, out.kl


def _categorical_elbo(target, logits, latents, options, class_dim, scales, reduction):
    """ELBOTerms with the categorical likelihood: its NLL from the categorical op, the KL
    from _kl_part, each reduced (and differentiated) alike, then added."""
    for name, value in scales.items():
        if value is not None:
            raise ValueError(f"{name} does not belong to likelihood 'categorical'")
    layout = check_categorical(target, logits, -1 if class_dim is None else class_dim)
    mu, logvar, prior_mu, prior_logvar = latents
    check_latents(*latents)
    if mu.shape[0] != target.shape[0]:
        raise ValueError(f"mu must be [B, *latent] with B = {target.shape[0]} (target's first "
                         f"dim), got {tuple(mu.shape)}")
    check_same_device(x=target, x_hat=logits, mu=mu, logvar=logvar, prior_mu=prior_mu,
                      prior_logvar=prior_logvar, z=options.z)
    if checking_values():
        check_categorical_values(target, logits, layout)
        check_values(mu=mu, logvar=logvar, beta=options.beta, capacity=options.capacity,
                     prior_mu=prior_mu, prior_logvar=prior_logvar)
    nll = categorical_outputs(target, logits, layout, reduction)
    kl_loss, kl = _kl_part(latents, options, reduction, logits)
    return ELBOTerms(nll.loss + kl_loss, reduce_rows(nll.nll, reduction).detach(),
                     reduce_rows(kl, reduction).detach())


def _common_options(likelihood, x_logvar, x_logscale, beta, free_bits, reduction):
    """``(likelihood, reduction, θ)`` of elbo_loss's common options, else None: a likelihood
    with a θ tensor of its own or none, a float β and free bits, finite and ≥ 0."""
    if type(likelihood) is not str or type(reduction) is not str:
        return None
    kind, reduction = LIKELIHOODS.get(likelihood), REDUCTIONS.get(reduction)
    if kind is None or reduction is None or type(beta) is not float \
            or type(free_bits) is not float or not (0.0 <= beta < math.inf
                                                    and 0.0 <= free_bits < math.inf):
        return None
    own = _THETA_ARGUMENTS[kind][0] if kind in _THETA_ARGUMENTS else None
    theta, other = (x_logvar, x_logscale) if own == "x_logvar" else (x_logscale, x_logvar)
    if other is not None or (own is None and theta is not None):
        return None
    return kind, reduction, theta


def _plain_tensors(x, x_hat, theta, mu, logvar) -> bool:
    """Whether every tensor is a ``torch.Tensor`` itself (not a subclass) with a floating dtype
    (θ may be None)."""
    return (type(x) is Tensor and type(x_hat) is Tensor and type(mu) is Tensor
            and type(logvar) is Tensor and (theta is None or type(theta) is Tensor)
            and x.is_floating_point() and x_hat.is_floating_point() and mu.is_floating_point()
            and logvar.is_floating_point() and (theta is None or theta.is_floating_point()))


def _common_device(x, x_hat, theta, mu, logvar) -> Optional[torch.device]:
    """The device of tensors in the common form, else None. Common: plain floating tensors
    (:func:`_plain_tensors`) on one device; x, x_hat and θ (or no θ) of one shape ``[B, *event]``
    (no sample dim, no broadcast); the latents of one shape ``[B, *latent]`` and dtype."""
    if not _plain_tensors(x, x_hat, theta, mu, logvar):
        return None
    device, shape = x.device, x.shape
    if len(shape) < 2 or x_hat.shape != shape or (theta is not None and theta.shape != shape):
        return None
    if mu.dim() < 2 or logvar.shape != mu.shape or mu.shape[0] != shape[0] \
            or logvar.dtype != mu.dtype:
        return None
    if x_hat.device != device or mu.device != device or logvar.device != device \
            or (theta is not None and theta.device != device):
        return None
    return device


def _common_loss(x, x_hat, mu, logvar, likelihood, x_logvar, x_logscale, beta, free_bits,
                 reduction):
    """elbo_loss's loss for a call in the common form (no option beyond the likelihood, θ,
    float β and free bits and the reduction, and tensors as :func:`_common_device` says), else
    None. Such a call is valid, and gets the op arguments the general path would give it (2-D
    tensors need no view), after a few attribute reads instead of the general path's hundred
    Python calls (the host cost per call is a benchmark: ``python -m bench.overhead``). Traced
    calls and the value-checking mode take the general path."""
    options = _common_options(likelihood, x_logvar, x_logscale, beta, free_bits, reduction)
    if options is None or torch.compiler.is_compiling() or checking_values():
        return None
    kind, reduction, theta = options
    device = _common_device(x, x_hat, theta, mu, logvar)
    if device is None:
        return None
    inputs = (_flattened(x, 1), _flattened(x_hat, 1),
              None if theta is None else _flattened(theta, 1), _flattened(mu, 1),
              _flattened(logvar, 1), None, None)
    needs_grad = _gradients_wanted(inputs, ROW_DIMS, reduction)
    beta = _constant(beta, accumulation_dtype(x, x_hat, theta, mu), device)
    return _ops.elbo_loss(*inputs, beta, None, None, int(kind), 0.0, free_bits, int(reduction),
                          needs_grad, device=device)


def _decoder_elbo(x, x_hat, latents, options, likelihood, scales, reduction, return_terms):
    """elbo_loss with a per-element likelihood: one fused op, or with a mixture prior the
    fused NLL plus the mixture's KL."""
    mu, logvar, prior_mu, prior_logvar = latents
    check_data(x, x_hat, "x_hat")
    check_latents(*latents)
    if mu.shape[0] != x.shape[0]:
        raise ValueError(f"mu must be [B, *latent] with B = {x.shape[0]} (x's first dim), got "
                         f"{tuple(mu.shape)}")
    theta, const = _theta(likelihood, scales, x_hat.shape)
    check_same_device(x=x, x_hat=x_hat, mu=mu, logvar=logvar, x_log_scale=theta,
                      prior_mu=prior_mu, prior_logvar=prior_logvar, z=options.z)
    if checking_values():
        check_values(("x",) if likelihood in _UNIT_INTERVAL_DATA else (), x=x, x_hat=x_hat,
                     mu=mu, logvar=logvar, beta=options.beta, capacity=options.capacity,
                     prior_mu=prior_mu, prior_logvar=prior_logvar, **scales)
    if options.prior is not None:
        nll = _nll(x, x_hat, theta, const, likelihood, reduction)
        kl_loss, kl = _kl_part(latents, options, reduction, x)
        terms = ELBOTerms(nll + kl_loss, nll.detach(), reduce_rows(kl, reduction).detach())
        return terms if return_terms else terms.loss
    arguments = (x, x_hat, theta, const, latents, options.beta, options.free_bits, likelihood,
                 reduction, options.capacity)
    if not return_terms:
        return _fused(*arguments, loss_only=True)
    out = _fused(*arguments)
    return ELBOTerms(out.loss, reduce_rows(out.nll, reduction).detach(),
                     reduce_rows(out.kl, reduction).detach())


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def reparameterize(mu: Tensor, logvar: Tensor, n_samples: Optional[int] = None, *,
                   seed=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Sample ``z = mu + exp(½·logvar)·ε`` with ε from fastvae's noise stream (docs/design.md).

    Args:
        mu, logvar: any shape, the same (element-wise; ``[B, *latent]`` in a VAE).
        n_samples: None for one sample shaped like ``mu``; an int S ≥ 1 for ``[S, *mu.shape]``.
        seed: int in [0, 2**63) or 0-dim int64 tensor; the same seed gives the same ε on every
            backend and device. Default: drawn from ``generator``, else from the default
            generator of ``mu``'s device (so ``torch.manual_seed`` makes runs repeatable).
    Returns:
        z in the promoted dtype of ``mu`` and ``logvar``. ε is not stored: backward
        regenerates it from the seed.
    """
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"mu and logvar must have the same shape, got {tuple(mu.shape)} and "
                         f"{tuple(logvar.shape)}")
    check_count("n_samples", n_samples, optional=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if seed is not None:
        check_seed(seed)
    check_same_device(mu=mu, logvar=logvar, seed=seed)  # (a seed made below is on mu's device)
    if seed is None:
        seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64, device=mu.device,
                             generator=generator)
    elif not isinstance(seed, Tensor):
        seed = torch.full((), seed, dtype=torch.int64, device=mu.device)
    if checking_values():
        check_values(mu=mu, logvar=logvar)
    dtype = _latent_dtype(mu, logvar)
    z = _ops.reparameterize(_as(mu, dtype).contiguous(), _as(logvar, dtype).contiguous(), seed,
                            1 if n_samples is None else n_samples)
    # One sample comes in mu's shape: no view, which would cost an autograd node each way.
    shape = mu.shape if n_samples is None else (n_samples, *mu.shape)
    return z if z.shape == shape else z.view(shape)


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Optional[Tensor] = None,
                prior_logvar: Optional[Tensor] = None) -> Tensor:
    """Analytic KL(N(mu, e^logvar) ‖ prior) in nats per datapoint: ``[B, *latent] → [B]``.

    The prior is N(0, I) by default, else the diagonal Gaussian N(prior_mu, e^prior_logvar)
    (either may be omitted: 0); both broadcast to ``mu``'s shape."""
    check_latents(mu, logvar, prior_mu, prior_logvar)
    check_same_device(mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    if checking_values():
        check_values(mu=mu, logvar=logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)
    empty = mu.new_empty(mu.shape[0], 0)
    return _fused(empty, empty, None, 0.0, (mu, logvar, prior_mu, prior_logvar),
                  1.0, 0.0, Likelihood.GAUSSIAN, Reduction.NONE, loss_only=True)


def gaussian_nll(x: Tensor, mean: Tensor, logvar: Optional[Tensor] = None, *, sigma=None,
                 reduction: str = "none") -> Tensor:
    """Gaussian negative log-likelihood in nats, constants included:
    ``½((x − mean)²/σ² + log σ² + log 2π)`` summed over event dims.

    Args:
        x: ``[B, *event]``. mean: ``[B, *event]`` or ``[S, B, *event]`` (S samples).
        logvar / sigma: the decoder variance as log σ² (note: a log-variance, where
            ``torch.nn.functional.gaussian_nll_loss`` takes a variance) or as σ, broadcasting
            against ``mean`` (scalar, ``[*event]``, ``[B, *event]`` or full); not both;
            neither means σ = 1.
        reduction: 'none' → ``[B]`` (NLL summed over event dims, averaged over samples);
            'mean' / 'sum' → mean / sum of that over B.
    """
    check_data(x, mean, "mean")
    reduction = choice("reduction", reduction, REDUCTIONS)
    theta, const = _decoder_scale(logvar, sigma, ("logvar", "sigma"), mean.shape, _gaussian_theta)
    check_same_device(x=x, mean=mean, logvar=theta, sigma=sigma)
    if checking_values():
        check_values(x=x, mean=mean, logvar=logvar, sigma=sigma)
    return _nll(x, mean, theta, const, Likelihood.GAUSSIAN, reduction)


def laplace_nll(x: Tensor, loc: Tensor, log_scale: Optional[Tensor] = None, *, scale=None,
                reduction: str = "none") -> Tensor:
    """Laplace negative log-likelihood in nats, ``|x − loc|/b + log 2b`` summed over event
    dims (an L1 reconstruction with a learned or fixed scale b).

    ``log_scale`` is log b, ``scale`` is b (a float or tensor); neither means b = 1. Shapes
    and reductions as :func:`gaussian_nll`."""
    check_data(x, loc, "loc")
    reduction = choice("reduction", reduction, REDUCTIONS)
    theta, const = _decoder_scale(log_scale, scale, ("log_scale", "scale"), loc.shape,
                                  _laplace_theta)
    check_same_device(x=x, loc=loc, log_scale=theta, scale=scale)
    if checking_values():
        check_values(x=x, loc=loc, log_scale=log_scale, scale=scale)
    return _nll(x, loc, theta, const, Likelihood.LAPLACE, reduction)


def bernoulli_nll(x: Tensor, logits: Tensor, *, reduction: str = "none") -> Tensor:
    """Bernoulli negative log-likelihood of ``x`` in [0, 1] given decoder **logits** (not
    probabilities), in nats: ``softplus(ℓ) − x·ℓ`` summed over event dims (stable form).

    Shapes and reductions as :func:`gaussian_nll`."""
    return _logits_nll(x, logits, Likelihood.BERNOULLI, reduction)


def continuous_bernoulli_nll(x: Tensor, logits: Tensor, *, reduction: str = "none") -> Tensor:
    """Continuous-Bernoulli negative log-likelihood of ``x`` in [0, 1] given decoder logits ℓ
    (Loaiza-Ganem & Cunningham 2019), in nats: ``softplus(ℓ) − x·ℓ − log C(ℓ)`` with the
    normaliser ``C(ℓ) = ℓ / tanh(ℓ/2)`` (2 at ℓ = 0), summed over event dims; stable for every
    ℓ. Shapes and reductions as :func:`gaussian_nll`."""
    return _logits_nll(x, logits, Likelihood.CONTINUOUS_BERNOULLI, reduction)


def elbo_loss(x: Tensor, x_hat: Tensor, mu: Tensor, logvar: Tensor, *,
              likelihood: str = "gaussian", x_logvar: Optional[Tensor] = None, sigma=None,
              x_logscale: Optional[Tensor] = None, scale=None, beta=1.0, free_bits: float = 0.0,
              prior_mu: Optional[Tensor] = None, prior_logvar: Optional[Tensor] = None,
              reduction: str = "mean", return_terms: bool = False, capacity=None,
              prior=None, z: Optional[Tensor] = None, class_dim: Optional[int] = None):
    """The negative ELBO, ``NLL + beta * KL``, in nats, fused in one pass; with a capacity C,
    ``NLL + beta * |KL − C|`` (Burgess et al. 2018).

    Args:
        x: data ``[B, *event]`` (class indices for the categorical likelihood).
        x_hat: decoder output ``[B, *event]`` or ``[S, B, *event]`` (the NLL is averaged over
            the S samples): the mean (Gaussian), the location (Laplace) or the **logits**
            (Bernoulli, continuous Bernoulli; probabilities would give a wrong loss); for the
            categorical likelihood logits with a class dim (see ``class_dim``).
        mu, logvar: the encoder's ``[B, *latent]``; the KL is summed over all latent dims.
        likelihood: 'gaussian', 'bernoulli', 'laplace', 'continuous_bernoulli' (x_hat are
            logits, as for the Bernoulli) or 'categorical' (see :func:`categorical_nll`).
        class_dim: categorical only: -1 (default) for ``x_hat`` of ``[(S,) B, *event, K]``, 1
            for ``[(S,) B, K, *event]``.
        x_logvar / sigma: Gaussian decoder variance as log σ² or σ (see :func:`gaussian_nll`).
        x_logscale / scale: Laplace decoder scale as log b or b (see :func:`laplace_nll`).
        beta: float or 0-dim tensor weighting the KL (a tensor avoids recompiles).
        free_bits: λ ≥ 0 nats per latent dim: a dim whose batch-mean KL is below λ
            contributes the constant λ instead (no gradient).
        prior_mu, prior_logvar: a diagonal Gaussian prior broadcasting to ``mu`` (default N(0, I)).
        reduction: 'mean' over datapoints (nats per datapoint), 'sum', or 'none' → ``[B]``.
        return_terms: also return the detached ``nll`` and ``kl`` (analytic, before free bits).
        capacity: None, or C ≥ 0 nats as a float or a 0-dim tensor without grad (a tensor lets
            an annealed C change without recompiles): each datapoint's KL term becomes
            ``|KL_b − C|`` (KL_b after free bits) before the reduction, as in pythae's
            DisentangledBetaVAE. AntixK's BetaVAE ('B' loss) instead takes ``|·|`` of the
            batch-mean KL, which differs when datapoints lie on both sides of C.
        prior, z: a :class:`fastvae.GaussianMixture` prior instead of a Gaussian one, with
            the sample(s) ``z`` (``[B, *latent]`` or ``[S, B, *latent]``) its KL is estimated
            from (:func:`fastvae.mixture_kl`); β and capacity apply, free bits do not (that
            KL is not a sum over latent dims). The NLL stays fused; the KL is a second op.
    Returns:
        The loss (float32; float64 for float64 inputs), or :class:`ELBOTerms`.
    """
    if (return_terms is False and sigma is None and scale is None and prior_mu is None
            and prior_logvar is None and capacity is None and prior is None and z is None
            and class_dim is None):
        loss = _common_loss(x, x_hat, mu, logvar, likelihood, x_logvar, x_logscale, beta,
                            free_bits, reduction)
        if loss is not None:
            return loss
    likelihood = choice("likelihood", likelihood, ELBO_LIKELIHOODS)
    reduction = choice("reduction", reduction, REDUCTIONS)
    check_flag("return_terms", return_terms)
    latents = (mu, logvar, prior_mu, prior_logvar)
    options = _KlOptions(beta, free_bits, capacity, prior, z)
    _check_kl_options(options, prior_mu, prior_logvar)
    scales = {"x_logvar": x_logvar, "sigma": sigma, "x_logscale": x_logscale, "scale": scale}
    if likelihood == CATEGORICAL:
        terms = _categorical_elbo(x, x_hat, latents, options, class_dim, scales, reduction)
        return terms if return_terms else terms.loss
    if class_dim is not None:
        raise ValueError("class_dim belongs to likelihood 'categorical' only")
    return _decoder_elbo(x, x_hat, latents, options, likelihood, scales, reduction, return_terms)
