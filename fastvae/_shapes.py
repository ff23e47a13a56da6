"""Output shapes of the ops (their fake implementations, for torch.compile and opcheck).

Each serves both the ``fastvae::*`` op and the native ``fastvae_native::*`` op of the same
name; the native schemas lack the trailing ``backend`` argument, hence the variadic tails.
"""
from ._common import Reduction, accumulation_dtype, sample_shape


def reparameterize(mu, logvar, seed, n_samples, *backend):
    return mu.new_empty(sample_shape(mu.shape, n_samples))


def reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar, *backend):
    return tuple(logvar.new_empty(logvar.shape if needed else (0,))
                 for needed in (need_mu, need_logvar))


def elbo(x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar, beta, capacity, grad_scale,
         likelihood, x_log_scale_const, free_bits, reduction, needs_grad, *backend):
    """Empty outputs shaped as the loss op's: (loss, nll, kl, kl_term, *grads)."""
    inputs = (x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar)
    acc = accumulation_dtype(x, x_hat, x_log_scale, mu)
    batch = x.shape[0]
    loss = x.new_empty(batch if reduction == Reduction.NONE else (), dtype=acc)
    rows = tuple(x.new_empty(batch, dtype=acc) for _ in range(3))
    grads = tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                  for t, need in zip(inputs, needs_grad))
    return (loss,) + rows + grads


def iwae(x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset,
         grad_scale, likelihood, x_log_scale_const, reduction, dreg, needs_grad, *backend):
    """Empty outputs shaped as the bound op's: (loss, log_weights, *grads)."""
    inputs = (x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset)
    acc = accumulation_dtype(x, x_hat, x_log_scale, z)
    loss = x.new_empty(x.shape[0] if reduction == Reduction.NONE else (), dtype=acc)
    grads = tuple(t.new_empty(t.shape) if need else x.new_empty(0)
                  for t, need in zip(inputs, needs_grad))
    return (loss, x.new_empty(x_hat.shape[:2], dtype=acc)) + grads


def mixture_log_ratio(z, mu, logvar, means, logvars, logits, *backend):
    acc = accumulation_dtype(z)
    return tuple(z.new_empty(z.shape[:2], dtype=acc) for _ in range(2))


def mixture_log_ratio_backward(grad, z, mu, logvar, means, logvars, logits, log_prior_sum,
                               needs_grad, *backend):
    inputs = (z, mu, logvar, means, logvars, logits)
    return tuple(t.new_empty(t.shape) if need else z.new_empty(0)
                 for t, need in zip(inputs, needs_grad))


def categorical(logits, target, grad_scale, classes_last, reduction, needs_grad, *backend):
    """Empty outputs shaped as the categorical op's: (loss, nll, grad_logits)."""
    acc = accumulation_dtype(logits)
    batch = logits.shape[1]
    loss = logits.new_empty(batch if reduction == Reduction.NONE else (), dtype=acc)
    grad = logits.new_empty(logits.shape if needs_grad[0] else (0,))
    return loss, logits.new_empty(batch, dtype=acc), grad


def scale_(grads, upstream):
    """In place: no outputs."""
