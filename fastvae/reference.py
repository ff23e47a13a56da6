"""The reference backend: plain PyTorch, hand-written gradients, the oracle for every kernel.

Every backend module (``reference``, ``_native``, ``_triton``) exposes ``DEVICE_TYPES`` (the
device types it runs on) and the same three functions with the same normalised arguments; the
public API in ``functional.py`` does the validation, reshaping and broadcasting, so a backend
only sees the shapes documented here.

``reparameterize_forward(mu, logvar, seed, n_samples) -> z``
    ``mu``, ``logvar``: contiguous 1-D ``[K]``, same dtype. ``seed``: int64 0-dim tensor on
    their device. Returns contiguous ``z`` of ``[n_samples * K]`` in their dtype, element
    ``i = s*K + k`` being ``mu[k] + exp(½ logvar[k]) * eps[i]``, ``eps`` the noise stream of
    DESIGN.md §3 for ``N = n_samples * K`` (float32; maths in float64 for float64 inputs).

``reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar)``
    ``grad_z``: contiguous ``[n_samples * K]``. Returns ``(grad_mu, grad_logvar)``, each
    ``[K]`` in ``logvar``'s dtype, or an empty tensor of that dtype when not needed. ε is
    regenerated.

``elbo(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
       free_bits, bernoulli, reduction, grad_scale, needs_grad)``
    Shapes: ``x [B, D]``, ``x_hat [S, B, D]`` (Gaussian mean or Bernoulli logits),
    ``x_logvar`` None (then the constant ``x_logvar_const`` is the decoder log-variance) or
    ``[Sl, Bl, Dl]`` with each of Sl, Bl, Dl either 1 (broadcast) or S, B, D;
    ``mu``, ``logvar`` ``[B, d]``; ``prior_mu``, ``prior_logvar`` both None (standard normal)
    or both ``[Bp, d]`` with Bp in {1, B}. All contiguous. ``x``, ``x_hat`` and ``x_logvar``
    may each have their own floating dtype; the four latent tensors share one dtype.
    ``beta``: 0-dim tensor in the loss dtype (float32; float64 when any input is float64).
    ``free_bits``: float ≥ 0. ``bernoulli``: bool.
    ``reduction``: 'none' | 'mean' | 'sum'.
    ``grad_scale``: None, or a ``[B]`` tensor of per-datapoint weights in the loss dtype
    (float32; float64 when any input is float64).
    ``needs_grad``: 7 bools for (x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar).

    Returns ``(loss, nll, kl, kl_term, grads)``:
      ``nll[b]`` = mean over samples of the NLL summed over D; ``kl[b]`` = analytic KL summed
      over d; ``kl_term[b]`` = the KL term the loss uses (free bits applied: a latent dim whose
      batch mean KL is below ``free_bits`` contributes the constant ``free_bits``);
      ``loss`` = ``nll + beta * kl_term`` reduced (0-dim for 'mean'/'sum', ``[B]`` for 'none').
      These are float32 (float64 when any input is float64).
      ``grads``: a 7-tuple, entry i the gradient of ``sum_b w_b * loss_b`` with respect to
      input i, in that input's dtype and shape, or an empty tensor in ``x``'s dtype where
      ``needs_grad[i]`` is False. ``w_b`` = ``grad_scale[b]`` when given, else 1/B for 'mean'
      and 1 otherwise.
      A broadcast input's gradient is summed over the dims it was broadcast along.
"""
import math

import torch

from ._philox import normal_stream

LOG_2PI = math.log(2.0 * math.pi)
DEVICE_TYPES = ("cpu", "cuda")


def accumulation_dtype(*tensors) -> torch.dtype:
    present = [t for t in tensors if t is not None]
    return torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32


def _noise(seed, numel, dtype):
    return normal_stream(seed, numel).to(dtype)


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-datapoint values ``[B]`` reduced as ``reduction`` says: 'none', 'sum' or 'mean'."""
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def reparameterize_forward(mu, logvar, seed, n_samples):
    acc = accumulation_dtype(mu)
    eps = _noise(seed, n_samples * mu.numel(), acc).view(n_samples, mu.numel())
    sigma = torch.exp(0.5 * logvar.to(acc))
    return (mu.to(acc) + sigma * eps).to(mu.dtype).reshape(-1)


def reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar):
    acc = accumulation_dtype(logvar)
    grad = grad_z.to(acc).view(n_samples, logvar.numel())
    grad_mu = grad.sum(0).to(logvar.dtype) if need_mu else logvar.new_empty(0)
    if need_logvar:
        eps = _noise(seed, grad_z.numel(), acc).view(n_samples, logvar.numel())
        half_sigma = 0.5 * torch.exp(0.5 * logvar.to(acc))
        grad_logvar = ((grad * eps).sum(0) * half_sigma).to(logvar.dtype)
    else:
        grad_logvar = logvar.new_empty(0)
    return grad_mu, grad_logvar


def _sum_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``grad`` over the dims where ``shape`` has size 1 (undoing a broadcast)."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


def _kl_elements(mu, logvar, prior_mu, prior_logvar):
    """Per-element KL and its gradients (mu, logvar, prior_mu, prior_logvar)."""
    var = torch.exp(logvar)
    if prior_mu is None:
        kl = 0.5 * (mu * mu + var - 1.0 - logvar)
        return kl, (mu, 0.5 * (var - 1.0), None, None)
    diff = mu - prior_mu
    inv_prior_var = torch.exp(-prior_logvar)
    spread = (var + diff * diff) * inv_prior_var
    kl = 0.5 * (prior_logvar - logvar + spread - 1.0)
    d_mu = diff * inv_prior_var
    return kl, (d_mu, 0.5 * (var * inv_prior_var - 1.0), -d_mu, 0.5 * (1.0 - spread))


def _nll_rows_and_grads(x, x_hat, x_logvar, bernoulli, weight, needs_grad):
    """NLL summed over D, ``[S, B]``, and the weighted per-element gradients of (x, x_hat,
    x_logvar) over ``[S, B, D]`` (None where not needed). Works in place where it can: this
    backend is also the fallback, and every B×D temporary costs a pass and its page faults."""
    need_x, need_x_hat, need_x_logvar = needs_grad[:3]
    if bernoulli:
        rows = (torch.nn.functional.softplus(x_hat) - x * x_hat).sum(-1)
        d_x = -x_hat * weight if need_x else None
        d_x_hat = (torch.sigmoid(x_hat) - x).mul_(weight) if need_x_hat else None
        return rows, (d_x, d_x_hat, None)
    residual = x - x_hat
    d_x = residual * torch.exp(-x_logvar)       # ∂/∂x of the NLL, = −∂/∂x_hat
    scaled_sq = residual.mul_(d_x)              # (x − m)²·e^−lv
    features = x_hat.shape[-1]
    if x_logvar.dim() and x_logvar.shape[-1] == features:
        logvar_rows = x_logvar.sum(-1)
    else:  # one log-variance for every feature (0-dim: the constant, or [Sl, Bl, 1])
        logvar_rows = (x_logvar.squeeze(-1) if x_logvar.dim() else x_logvar) * features
    rows = 0.5 * (scaled_sq.sum(-1) + logvar_rows + features * LOG_2PI)
    d_x_logvar = scaled_sq.neg_().add_(1.0).mul_(0.5 * weight) if need_x_logvar else None
    d_x = d_x.mul_(weight) if need_x or need_x_hat else None
    return rows, (d_x, None if d_x is None or not need_x_hat else -d_x, d_x_logvar)


def elbo(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
         free_bits, bernoulli, reduction, grad_scale, needs_grad):
    acc = accumulation_dtype(x, x_hat, x_logvar, mu)
    n_samples, batch, _ = x_hat.shape
    inputs = (x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar)
    xa, x_hat_a = x.to(acc), x_hat.to(acc)
    if x_logvar is not None:
        lv_x = x_logvar.to(acc)
    else:
        lv_x = torch.full((), x_logvar_const, dtype=acc, device=x.device)
    if grad_scale is not None:
        weight = grad_scale.to(acc)
    else:
        weight = torch.full((batch,), 1.0 / max(batch, 1) if reduction == "mean" else 1.0,
                            dtype=acc, device=x.device)
    nll_weight = (weight / n_samples).view(1, batch, 1)
    nll_rows, nll_grads = _nll_rows_and_grads(xa, x_hat_a, lv_x, bernoulli, nll_weight, needs_grad)
    nll = nll_rows.sum(0) / n_samples

    latents = [t.to(acc) if t is not None else None for t in (mu, logvar, prior_mu, prior_logvar)]
    kl_el, kl_grads = _kl_elements(*latents)
    kl = kl_el.sum(-1)
    if free_bits > 0:
        active = (kl_el.mean(0) >= free_bits).to(acc)  # [d]
        kl_term = (kl_el * active).sum(-1) + (1.0 - active).sum() * free_bits
    else:
        active = None
        kl_term = kl.clone()  # outputs of an op never alias each other
    beta_a = beta.to(acc)
    loss_rows = nll + beta_a * kl_term
    loss = reduce_rows(loss_rows, reduction)

    kl_weight = (beta_a * weight).view(batch, 1)
    if active is not None:
        kl_weight = kl_weight * active

    grads = []
    for i, tensor in enumerate(inputs):
        if not needs_grad[i]:
            grads.append(x.new_empty(0))
            continue
        if i < 3:
            grad = nll_grads[i]
            if i == 0:
                grad = grad.sum(0)
        else:
            grad = kl_grads[i - 3] * kl_weight
        grads.append(_sum_to(grad, tensor.shape).to(tensor.dtype).reshape(tensor.shape))
    return loss, nll, kl, kl_term, tuple(grads)
