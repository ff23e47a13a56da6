"""The fused ops, registered once with ``torch.library``; the backend is an argument.

Each op has a fake implementation (shapes only) for ``torch.compile`` and an autograd
registration. The loss op computes its gradients in the forward pass; its backward only scales
them by the upstream gradient. The sampling op saves only ``logvar`` (an input) and the seed,
and regenerates ε in backward.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _backends

# ----------------------------------------------------------------------------------------------
# reparameterised sampling
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int, backend: str) -> Tensor:
    return _backends.module(backend).reparameterize_forward(mu, logvar, seed, n_samples)


# The *_shapes functions are also the fake implementations of the native ops, whose schemas
# lack the trailing ``backend`` argument: hence the variadic tails.
def reparameterize_shapes(mu, logvar, seed, n_samples, *backend):
    return mu.new_empty(n_samples * mu.numel())


reparameterize.register_fake(reparameterize_shapes)


@torch.library.custom_op("fastvae::reparameterize_backward", mutates_args=())
def reparameterize_backward(grad_z: Tensor, logvar: Tensor, seed: Tensor, n_samples: int,
                            backend: str, need_mu: bool, need_logvar: bool) -> Tuple[Tensor, Tensor]:
    return _backends.module(backend).reparameterize_backward(
        grad_z.contiguous(), logvar, seed, n_samples, need_mu, need_logvar)


def reparameterize_backward_shapes(grad_z, logvar, seed, n_samples, *backend_and_needs):
    return tuple(logvar.new_empty(logvar.shape if needed else (0,))
                 for needed in backend_and_needs[-2:])


reparameterize_backward.register_fake(reparameterize_backward_shapes)


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, seed, n_samples, backend = inputs
    ctx.save_for_backward(logvar, seed)
    ctx.n_samples, ctx.backend = n_samples, backend


def _reparameterize_grad(ctx, grad_z):
    logvar, seed = ctx.saved_tensors
    need_mu, need_logvar = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_mu, grad_logvar = reparameterize_backward(
        grad_z, logvar, seed, ctx.n_samples, ctx.backend, need_mu, need_logvar)
    return (grad_mu if need_mu else None, grad_logvar if need_logvar else None, None, None, None)


reparameterize.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


# ----------------------------------------------------------------------------------------------
# the fused loss
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvae::elbo", mutates_args=())
def elbo(x: Tensor, x_hat: Tensor, x_logvar: Optional[Tensor], x_logvar_const: float,
         mu: Tensor, logvar: Tensor, prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor],
         beta: Tensor, free_bits: float, bernoulli: bool, reduction: str,
         grad_scale: Optional[Tensor], needs_grad: List[bool], backend: str
         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, nll, kl, kl_term, grads = _backends.module(backend).elbo(
        x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
        free_bits, bernoulli, reduction, grad_scale, needs_grad)
    return (loss, nll, kl, kl_term) + tuple(grads)


def elbo_shapes(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
                free_bits, bernoulli, reduction, grad_scale, needs_grad, *backend):
    """Empty outputs shaped as the loss op's (its fake implementation, and the native op's)."""
    inputs = (x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar)
    acc = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in inputs[:4]) \
        else torch.float32
    batch = x.shape[0]
    loss = x.new_empty(batch if reduction == "none" else (), dtype=acc)
    rows = tuple(x.new_empty(batch, dtype=acc) for _ in range(3))
    grads = tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                  for t, need in zip(inputs, needs_grad))
    return (loss,) + rows + grads


elbo.register_fake(elbo_shapes)


def _elbo_setup(ctx, inputs, output):
    (x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta, free_bits,
     bernoulli, reduction, grad_scale, needs_grad, backend) = inputs
    # Only the loss carries gradient; without this autograd would fill zeros shaped like every
    # other output (the B×D gradient outputs among them) on each backward.
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.needs_grad = needs_grad
    ctx.beta_needs_grad = beta.requires_grad
    ctx.deferred = any(ctx.needs_input_grad[i] and not needs_grad[j]
                       for j, i in enumerate((0, 1, 2, 4, 5, 6, 7)))
    kl_term = output[3]
    if ctx.deferred:
        # Gradients that could not be formed in forward (reduction='none' with an input shared
        # by every datapoint): keep the inputs, recompute with the upstream gradient as weights.
        ctx.save_for_backward(x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar, beta, kl_term)
        ctx.options = (x_logvar_const, free_bits, bernoulli, backend)
    else:
        ctx.save_for_backward(beta, kl_term, *output[4:])


def _elbo_grad(ctx, grad_loss, *unused_grads):
    if grad_loss is None:  # the loss itself was not used; the other outputs carry no gradient
        return (None,) * 15
    if ctx.deferred:
        *inputs, beta, kl_term = ctx.saved_tensors
        x_logvar_const, free_bits, bernoulli, backend = ctx.options
        needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5, 6, 7)]
        x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar = inputs
        rows = grad_loss.expand(x.shape[0]).contiguous()
        if ctx.reduction == "mean":
            rows = rows / max(x.shape[0], 1)
        out = elbo(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
                   free_bits, bernoulli, "none", rows, needs, backend)
        grads = [g if need else None for g, need in zip(out[4:], needs)]
    else:
        beta, kl_term, *saved = ctx.saved_tensors
        unit = _is_one(grad_loss)
        grads = [(g if unit else _scale(g, grad_loss)) if need else None
                 for g, need in zip(saved, ctx.needs_grad)]
    grad_beta = None
    if ctx.beta_needs_grad:
        total = kl_term.mean() if ctx.reduction == "mean" else None
        grad_beta = (grad_loss * (total if total is not None else kl_term)).sum().to(beta.dtype)
    x_grad, x_hat_grad, x_logvar_grad, mu_grad, logvar_grad, prior_mu_grad, prior_logvar_grad = grads
    return (x_grad, x_hat_grad, x_logvar_grad, None, mu_grad, logvar_grad, prior_mu_grad,
            prior_logvar_grad, grad_beta, None, None, None, None, None, None)


def _traced(tensor: Tensor) -> bool:
    """True while torch.compile / make_fx trace: values are unknown and must not be read."""
    return (torch.compiler.is_compiling() or type(tensor) is not torch.Tensor
            or torch._guards.detect_fake_mode((tensor,)) is not None
            or torch._is_functional_tensor(tensor))


def _is_one(grad_loss: Tensor) -> bool:
    """Whether the upstream gradient is the scalar 1 of a plain ``loss.backward()``, in which
    case the gradients formed in forward are already final: no pass over them at all. Only
    read for a concrete CPU scalar (no device sync; never while tracing)."""
    return (grad_loss.dim() == 0 and grad_loss.device.type == "cpu" and not _traced(grad_loss)
            and grad_loss.item() == 1.0)


def _scale(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad`` (computed in forward with unit upstream gradient) times the upstream gradient:
    a scalar for 'mean'/'sum', one weight per datapoint for 'none' (the leading dim of every
    per-row gradient; ``x_hat``'s and ``x_logvar``'s second, after the sample dim)."""
    weights = grad_loss.to(grad.dtype)
    if grad_loss.dim() == 0:
        return grad * weights
    if grad.dim() == 3:
        return grad * weights.view(1, -1, 1)
    return grad * weights.view(-1, *([1] * (grad.dim() - 1)))


elbo.register_autograd(_elbo_grad, setup_context=_elbo_setup)
