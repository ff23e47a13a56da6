"""The two fused ops and their autograd, on two call paths that share one backward.

* Eager calls take the fast path: a ``torch.autograd.Function`` calling the resolved backend
  module directly, or the backend itself when no gradient is wanted. Python between the user
  and the kernel is one cached backend lookup and the Function's own dispatch.
* Under ``torch.compile`` the same computation is the ``torch.library`` custom op
  ``fastvae::elbo`` / ``fastvae::reparameterize``, with fake implementations and
  ``register_autograd``, so the compiler sees one opaque node with known shapes; ``opcheck``
  tests these ops.

The loss forms its gradients in the forward pass. Its backward multiplies them by the upstream
gradient: on the eager path in place, by the backend's ``scale_``, whose kernels test on the
device whether the upstream gradient is 1 and then touch nothing (a plain ``loss.backward()``
costs no pass over the gradients and no host sync); under tracing as an ordinary multiply.
Only the first backward through a graph scales in place; a later one (``retain_graph=True``)
returns new tensors, so a gradient already handed to autograd never changes.
The sampling op saves only ``logvar`` (an input) and the seed, and regenerates ε in backward.
"""
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _shapes, backends
from ._common import Reduction


class ElboOutputs(NamedTuple):
    """The loss op's outputs: the reduced loss, three per-datapoint ``[B]`` rows (the NLL,
    the analytic KL and the KL term after free bits) and the 7 gradient slots, named as
    ``fastvae._common.INPUTS`` (empty where not requested)."""
    loss: Tensor
    nll: Tensor
    kl: Tensor
    kl_term: Tensor
    grad_x: Tensor
    grad_x_hat: Tensor
    grad_x_log_scale: Tensor
    grad_mu: Tensor
    grad_logvar: Tensor
    grad_prior_mu: Tensor
    grad_prior_logvar: Tensor


_SLOTS = 7        # differentiable tensor inputs, gradient slot i = op input i
_BETA = 7         # op input index of beta
_CAPACITY = 8     # op input index of capacity (None, or a 0-dim tensor without gradient)
_ELBO_ARGS = 16   # op inputs including the trailing backend


# ----------------------------------------------------------------------------------------------
# reparameterised sampling
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def reparameterize_op(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int,
                      backend: str) -> Tensor:
    return backends.module(backend).reparameterize_forward(mu, logvar, seed, n_samples)


@torch.library.custom_op("fastvae::reparameterize_backward", mutates_args=())
def reparameterize_backward_op(grad_z: Tensor, logvar: Tensor, seed: Tensor, n_samples: int,
                               need_mu: bool, need_logvar: bool,
                               backend: str) -> Tuple[Tensor, Tensor]:
    return backends.module(backend).reparameterize_backward(
        grad_z, logvar, seed, n_samples, need_mu, need_logvar)


reparameterize_op.register_fake(_shapes.reparameterize)
reparameterize_backward_op.register_fake(_shapes.reparameterize_backward)


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, seed, n_samples, backend = inputs
    ctx.save_for_backward(logvar, seed)
    ctx.n_samples, ctx.backend = n_samples, backend


def _reparameterize_grad(ctx, grad_z):
    logvar, seed = ctx.saved_tensors
    need_mu, need_logvar = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    args = (grad_z.contiguous(), logvar, seed, ctx.n_samples, need_mu, need_logvar)
    if isinstance(ctx.backend, str):
        grad_mu, grad_logvar = reparameterize_backward_op(*args, ctx.backend)
    else:
        grad_mu, grad_logvar = ctx.backend.reparameterize_backward(*args)
    return (grad_mu if need_mu else None, grad_logvar if need_logvar else None, None, None, None)


reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


class _EagerReparameterize(torch.autograd.Function):
    """The eager path: the last input is the backend module instead of its name. (forward
    takes ctx itself: with a separate setup_context, ``apply`` binds the arguments through
    ``inspect.signature`` on every call, which costs more than the rest of the call.)"""

    @staticmethod
    def forward(ctx, mu, logvar, seed, n_samples, backend):
        z = backend.reparameterize_forward(mu, logvar, seed, n_samples)
        _reparameterize_setup(ctx, (mu, logvar, seed, n_samples, backend), z)
        return z

    backward = staticmethod(_reparameterize_grad)


def reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int) -> Tensor:
    """``z`` of ``[n_samples * K]`` for 1-D ``mu``, ``logvar`` on the selected backend."""
    if torch.compiler.is_compiling():
        name = backends.resolve_name(backends.get_backend(), mu.device.type)
        return reparameterize_op(mu, logvar, seed, n_samples, name)
    backend = backends.implementation(mu.device)[1]
    if torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad):
        return _EagerReparameterize.apply(mu, logvar, seed, n_samples, backend)
    return backend.reparameterize_forward(mu, logvar, seed, n_samples)


# ----------------------------------------------------------------------------------------------
# the fused loss
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvae::elbo", mutates_args=())
def elbo_op(x: Tensor, x_hat: Tensor, x_log_scale: Optional[Tensor], mu: Tensor, logvar: Tensor,
            prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor], beta: Tensor,
            capacity: Optional[Tensor], grad_scale: Optional[Tensor], likelihood: int,
            x_log_scale_const: float, free_bits: float, reduction: int, needs_grad: List[bool],
            backend: str
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                       Tensor, Tensor]:
    return tuple(backends.module(backend).elbo(
        x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar, beta, capacity, grad_scale,
        likelihood, x_log_scale_const, free_bits, reduction, needs_grad))


elbo_op.register_fake(_shapes.elbo)


def _elbo_setup(ctx, inputs, output):
    needs_grad, backend = inputs[14], inputs[15]
    # Only the loss carries gradient; without this autograd would fill zeros shaped like every
    # other output (the B×D gradient outputs among them) on each backward.
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.backend = inputs[13], backend
    ctx.eager = not isinstance(backend, str)
    ctx.first_upstream = None  # the upstream gradient of the first backward, once there was one
    # A gradient that could not be formed in forward (reduction 'none' with an input shared by
    # every datapoint) is recomputed in backward with the upstream gradient as row weights.
    ctx.deferred = any(ctx.needs_input_grad[i] and not needs_grad[i] for i in range(_SLOTS))
    kl_term = output[3]
    if ctx.deferred:
        ctx.save_for_backward(*inputs[:_CAPACITY + 1], kl_term)
        ctx.options = inputs[10:13]  # likelihood, x_log_scale_const, free_bits
    else:
        ctx.save_for_backward(inputs[_BETA], kl_term, *output[4:])


def _elbo_grad(ctx, grad_loss, *unused_grads):
    if grad_loss is None:  # the loss itself was not used; the other outputs carry no gradient
        return (None,) * _ELBO_ARGS
    if ctx.deferred:
        *inputs, beta, capacity, kl_term = ctx.saved_tensors
        grads = _recomputed_grads(ctx, inputs, beta, capacity, grad_loss)
    else:
        beta, kl_term, *saved = ctx.saved_tensors
        grads = _scaled_grads(ctx, saved, grad_loss)
    grad_beta = None
    if ctx.needs_input_grad[_BETA]:
        per_row = kl_term.mean() if ctx.reduction == Reduction.MEAN else kl_term
        grad_beta = (grad_loss * per_row).sum().to(beta.dtype)
    # No gradient for capacity and the options (the API refuses a capacity requiring grad).
    return (*grads, grad_beta) + (None,) * (_ELBO_ARGS - _SLOTS - 1)


def _recomputed_grads(ctx, inputs, beta, capacity, grad_loss):
    batch = inputs[0].shape[0]
    rows = grad_loss.expand(batch).contiguous()
    if ctx.reduction == Reduction.MEAN:
        rows = rows / max(batch, 1)
    needs = [bool(n) for n in ctx.needs_input_grad[:_SLOTS]]
    args = (*inputs, beta, capacity, rows, *ctx.options, int(Reduction.NONE), needs)
    out = ctx.backend.elbo(*args) if ctx.eager else elbo_op(*args, ctx.backend)
    return [g if need else None for g, need in zip(out[4:], needs)]


def _scaled_grads(ctx, saved, grad_loss):
    """The gradients formed in forward times the upstream gradient ``grad_loss``."""
    grads = [g if need else None for g, need in zip(saved, ctx.needs_input_grad[:_SLOTS])]
    if not ctx.eager:
        return [None if g is None else _scaled(g, grad_loss, None) for g in grads]
    upstream = grad_loss.contiguous()
    if ctx.first_upstream is not None:  # a later backward through a retained graph
        first = _first_upstream(ctx)
        return [None if g is None else _scaled(g, upstream, first) for g in grads]
    # The gradients are the loss's own buffers, not yet handed out: scale them in place. .data
    # has its own version counter, so retaining the graph does not trip autograd's check.
    ctx.backend.scale_([_row_view(g.data, upstream) for g in grads if g is not None and g.numel()],
                       upstream)
    # Kept by reference (a copy would cost a kernel per step); its version tells a later
    # backward whether the caller changed it in place since.
    ctx.first_upstream = (upstream, upstream._version)
    return grads


def _first_upstream(ctx) -> Tensor:
    """The upstream gradient the buffers were scaled by in place, checked to be usable."""
    first, version = ctx.first_upstream
    if first._version != version:
        raise RuntimeError("fastvae: the gradient passed to the first backward through this "
                           "retained graph was modified in place since; pass a new tensor to "
                           "backward instead of changing that one")
    # This read syncs, but only on a later backward through a retained graph.
    if bool((first == 0).any()):
        raise RuntimeError("fastvae: backward through a retained graph whose first backward "
                           "had an upstream gradient of 0, which scaled the loss's gradients "
                           "to 0 in place; run the first backward with a nonzero gradient")
    return first


def _row_view(grad: Tensor, upstream: Tensor) -> Tensor:
    """``grad`` as ``scale_`` takes it: as it is for a 0-dim upstream, else ``[L, B, T]`` (a
    gradient is ``[B, n]`` or ``[L, B, n]``, see the backend contract)."""
    return grad.unsqueeze(0) if upstream.dim() and grad.dim() == 2 else grad


def _scaled(grad: Tensor, upstream: Tensor, previous: Optional[Tensor]) -> Tensor:
    """A new tensor ``grad * upstream / previous``, per row for a ``[B]`` upstream."""
    factor = upstream if previous is None else upstream / previous
    factor = factor.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if factor.dim():  # rows are dim 0 of a [B, n] gradient and dim 1 of an [L, B, n] one
        factor = factor.view(-1, 1) if grad.dim() == 2 else factor.view(1, -1, 1)
    return (grad * factor).to(grad.dtype)


elbo_op.register_autograd(_elbo_grad, setup_context=_elbo_setup)


class _EagerElbo(torch.autograd.Function):
    """The eager path: the last input is the backend module instead of its name (forward
    takes ctx itself, see _EagerReparameterize)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = inputs[-1].elbo(*inputs[:-1])
        _elbo_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    backward = staticmethod(_elbo_grad)


def elbo(*args, device: torch.device) -> ElboOutputs:
    """The loss op on the backend for ``device``; ``args`` are the op's (without backend)."""
    if torch.compiler.is_compiling():
        name = backends.resolve_name(backends.get_backend(), device.type)
        return ElboOutputs._make(elbo_op(*args, name))
    backend = backends.implementation(device)[1]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:_BETA + 1]):
        return ElboOutputs._make(_EagerElbo.apply(*args, backend))
    return ElboOutputs._make(backend.elbo(*args))
