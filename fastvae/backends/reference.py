"""The reference backend: plain PyTorch, hand-written gradients, the oracle for every kernel.

Every backend module (``reference``, ``native``, ``triton``) exposes ``DEVICE_TYPES`` (the
device types it runs on), ``RECORDS_AUTOGRAD`` (whether its ``elbo``, ``iwae``,
``categorical``, ``reparameterize_forward`` and ``mixture_log_ratio`` record their own autograd
node, by the rules of ``fastvae._ops``; where they do not, ``fastvae._ops`` wraps them) and the
same functions with the same normalised arguments; the public API in ``functional.py`` does
the validation, reshaping and broadcasting, so a backend only sees the shapes documented here.
A backend may also expose ``elbo_loss``: ``elbo``'s loss alone, for eager calls (the native
backend's avoids making Python objects of the other outputs).

``reparameterize_forward(mu, logvar, seed, n_samples) -> z``
    ``mu``, ``logvar``: contiguous, of one shape (any; K elements) and dtype. ``seed``: int64
    0-dim tensor on their device. Returns contiguous ``z`` in their dtype, of
    ``_common.sample_shape(mu.shape, n_samples)`` (``[n_samples * B, *rest]``: one sample has
    ``mu``'s shape, so the caller needs no view), flat element ``i = s*K + k`` being
    ``mu[k] + exp(½ logvar[k]) * eps[i]`` (flat k), ``eps`` the noise stream of docs/design.md
    (float32; maths in float64 for float64 inputs).

``reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar)``
    ``grad_z``: contiguous, ``n_samples * K`` elements in the flat order of ``z``. Returns
    ``(grad_mu, grad_logvar)``, each shaped like ``logvar`` in its dtype, or an empty tensor of
    that dtype when not needed. ε is regenerated.

``elbo(x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar, beta, capacity, grad_scale,
       likelihood, x_log_scale_const, free_bits, reduction, needs_grad)``
    The first seven arguments are the differentiable inputs, in the order of
    ``fastvae._common.INPUTS``: input i has gradient slot i.
    Shapes: ``x [B, D]``, ``x_hat [S, B, D]``, or ``[B, D]`` for one sample (the decoder
    output: Gaussian or Laplace location, Bernoulli logits); ``x_log_scale`` θ, the decoder's
    scale parameter in log form (log σ² for the Gaussian, log b for the Laplace, unused by the
    Bernoulli): None (then the float ``x_log_scale_const`` is θ) or ``[Sl, Bl, Dl]`` with each
    of Sl, Bl, Dl either 1 (broadcast) or S, B, D, where leading size-1 dims may be left out
    (at most ``x_hat``'s dims, broadcast right-aligned; ``_common.decoder_views``): the public
    API passes one sample and θ as they come, so it makes no view; ``mu``, ``logvar``
    ``[B, d]``; ``prior_mu``, ``prior_logvar`` both None (standard normal) or both ``[Bp, d]``
    with Bp in {1, B}. All contiguous. ``x``, ``x_hat`` and ``x_log_scale`` may each have
    their own floating dtype; the four latent tensors share one dtype. ``beta``: 0-dim tensor
    in the loss dtype (float32; float64 when any input is float64). ``capacity``: None, or the
    KL capacity C (Burgess et al. 2018) as a 0-dim tensor in the loss dtype, read where it lies
    (no host sync). ``grad_scale``: None, or a ``[B]`` tensor of per-datapoint weights in the
    loss dtype. ``likelihood``: a ``Likelihood`` value. ``free_bits``: float ≥ 0.
    ``reduction``: a ``Reduction`` value.
    ``needs_grad``: 7 bools, one per slot.

    Returns the 11-tuple ``(loss, nll, kl, kl_term, *grads)``:
      ``nll[b]`` = mean over samples of the NLL summed over D; ``kl[b]`` = analytic KL summed
      over d; ``kl_term[b]`` = the KL term β multiplies: ``KL_fb[b]``, the KL with free bits
      applied (a latent dim whose batch mean KL is below ``free_bits`` contributes the
      constant ``free_bits``), or with a capacity ``|KL_fb[b] − C|``;
      ``loss`` = ``nll + beta * kl_term`` reduced (0-dim for MEAN/SUM, ``[B]`` for NONE).
      These are in the loss dtype.
      ``grads``: 7 tensors, slot i the gradient of ``sum_b w_b * loss_b`` with respect to
      input i, in that input's dtype and shape, or an empty tensor in ``x``'s dtype where
      ``needs_grad[i]`` is False. ``w_b`` = ``grad_scale[b]`` when given, else 1/B for MEAN
      and 1 otherwise. A broadcast input's gradient is summed over the dims it was broadcast
      along. With a capacity, every latent gradient (mu, logvar, prior_mu, prior_logvar) of
      row b carries the factor ``sign(KL_fb[b] − C)`` (0 where they are equal): the row's KL
      weight is ``beta * w_b * sign(KL_fb[b] − C)``.

    Capacity is pythae's DisentangledBetaVAE form, |·| per datapoint before the reduction;
    AntixK's BetaVAE ('B' loss) takes |·| of the batch-mean KL instead, which differs when
    rows lie on both sides of C. A row's sign is known only once its KL is summed, so a fused
    backend with a capacity first runs a KL-only pre-pass over the latents (B×d) for KL_fb,
    then its fused pass with the signed row weights; without one, no extra pass runs.

``iwae(x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset,
       grad_scale, likelihood, x_log_scale_const, reduction, dreg, needs_grad)``
    The importance-weighted bound (Burda et al. 2016) with S samples per datapoint. The first
    nine arguments are the differentiable inputs (``fastvae._common.IWAE_INPUTS``). ``x``,
    ``x_hat``, ``x_log_scale``, ``grad_scale``, ``likelihood``, ``x_log_scale_const`` and
    ``reduction`` as in ``elbo``, except that ``x_hat`` is always ``[S, B, D]`` and θ always
    ``[Sl, Bl, Dl]`` (no dim left out); ``z [S, B, d]`` the samples the decoder saw, ``mu``,
    ``logvar`` ``[B, d]`` the encoder's q(z|x), the prior as in ``elbo`` (the four latent
    tensors share one dtype); ``log_weight_offset``: None or ``[S, B]`` in the loss dtype, added
    to the log weights (zero in use: its gradient carries the normalised weights back to
    ``fastvae.dreg``'s identity); ``dreg``: bool; ``needs_grad``: 9 bools. With
    ``log w[s, b] = −Σ_D nll(x, x̂[s, b], θ) + log p(z[s, b]) − log q(z[s, b] | x) + offset[s, b]``
    (diagonal Gaussians summed over d; the log 2π terms cancel) and ``w̃ = softmax_s(log w)``:

    Returns the 11-tuple ``(loss, log_weights, *grads)``: ``loss`` = the rows
    ``log S − logsumexp_s log w[:, b]`` (the negative bound) reduced; ``log_weights`` the
    ``[S, B]`` log w; both in the loss dtype (as ``elbo``'s, with ``z`` in place of ``mu``).
    ``grads``: 9 tensors as in ``elbo``, for the weights ``a[s, b] = w_b·w̃[s, b]`` of the
    samples: a·∂nll for x (summed over s), x_hat and θ; for z
    ``w_b·w̃^k·((z − m)e^−v − (z − μ)e^−λ)`` with k = 2 when ``dreg`` (the doubly
    reparameterised estimator, Tucker et al. 2018) else 1, (m, v) the prior's mean and
    log-variance and λ = logvar; Σ_s a·(z − μ)e^−λ for mu; Σ_s a·½((z − μ)²e^−λ − 1) for logvar;
    −Σ_s a·(z − m)e^−v and −Σ_s a·½((z − m)²e^−v − 1) for the prior; −a for the offset.

``mixture_log_ratio(z, mu, logvar, means, logvars, logits) -> (log_ratio, log_prior_sum)``
    The single-sample KL estimate ``log q(z|x) − log p(z)`` for a mixture-of-Gaussians prior
    ``p(z) = Σ_k π_k N(z; means[k], e^logvars[k])``, ``π = softmax(logits)``, with q(z|x) =
    N(mu, e^logvar) (diagonal Gaussians summed over d; the log 2π terms cancel). ``z``
    ``[S, B, d]``; ``mu``, ``logvar`` ``[B, d]``; ``means``, ``logvars`` ``[K, d]`` (K ≥ 1);
    ``logits`` ``[K]``; all contiguous, one floating dtype. Returns two ``[S, B]`` tensors in the
    accumulation dtype: the log ratio, and ``log Σ_k exp(logits_k + c_k)`` with
    ``c_k = −½Σ_d((z − means_k)²e^−logvars_k + logvars_k)`` (what backward needs to form the
    responsibilities ``r_k = exp(logits_k + c_k − log_prior_sum)``, without a ``[S, B, K]``
    tensor). Streams over k: no ``[S, B, K, d]`` tensor in the kernels.

``mixture_log_ratio_backward(grad, z, mu, logvar, means, logvars, logits, log_prior_sum,
                             needs_grad)``
    ``grad`` ``[S, B]`` the upstream gradient of the log ratio; ``needs_grad`` 6 bools. Returns
    the gradients of (z, mu, logvar, means, logvars, logits) in their dtypes (empty where not
    needed): with ``g = grad`` and ``π`` the mixture weights, ``g·(Σ_k r_k(z − m_k)e^−v_k −
    (z − μ)e^−λ)`` for z; Σ_s g·(z − μ)e^−λ for mu; Σ_s g·½((z − μ)²e^−λ − 1) for logvar;
    −Σ_{s,b} g·r_k(z − m_k)e^−v_k, −Σ_{s,b} g·r_k·½((z − m_k)²e^−v_k − 1) and
    −Σ_{s,b} g·(r_k − π_k) for the components (m, v) = (means, logvars) and the logits.

``categorical(logits, target, grad_scale, classes_last, reduction, needs_grad)``
    The categorical likelihood of discrete data (the NLL of ``F.cross_entropy``), with the
    gradient formed in forward as Liger-Kernel's cross-entropy does. ``logits``: contiguous
    ``[S, B, D, K]`` when ``classes_last`` else ``[S, B, K, D]`` (the class-second layout of
    ``F.cross_entropy``), float16, bfloat16, float32 or float64, S ≥ 1, K ≥ 1 (not bounded by
    the kernels: their log-sum-exp over K is online or tiled); ``target``: contiguous ``[B, D]``,
    int64 or uint8; ``grad_scale``, ``reduction`` as in ``elbo``; ``needs_grad``: 1 bool.
    With ``ℓ = logits[s, b, d, :]`` (or ``[s, b, :, d]``) and ``t = target[b, d]``:

    Returns ``(loss, nll, grad_logits)``: ``nll[b]`` = mean over s of
    ``Σ_d (logsumexp_k ℓ_k − ℓ_t)`` and ``loss`` = ``nll`` reduced, both in the loss dtype
    (float64 for float64 logits, else float32); ``grad_logits`` = ``w_b/S·(softmax(ℓ) −
    onehot(t))`` in ``logits``' dtype and layout (``w_b`` as in ``elbo``), or an empty tensor
    of that dtype when not needed. A target outside [0, K) is never read from: that position's
    NLL, and with it the row's, is NaN, and so is its gradient.

``scale_(grads, upstream)``
    Multiplies gradients formed with a unit upstream gradient by the actual one, in place.
    ``upstream`` is 0-dim, or ``[B]`` per-datapoint weights; then every grad is a ``[L, B, T]``
    view around its datapoint dim (``fastvae._common.ROW_DIMS`` and its kin): the categorical
    gradient as ``[S, B, D·K]``, the log-weight offset's as ``[S, B, 1]``. Each element becomes
    ``g * upstream``, computed in float32 (float64 for float64 grads) and rounded once. Where
    ``upstream`` is 1 (per row for ``[B]``) nothing is written; kernels make that test on the
    device (no host sync).

The per-element negative log-likelihoods, with r = x − x̂ and θ as above:
    GAUSSIAN  ½(r²·e^−θ + θ + log 2π)
    BERNOULLI softplus(x̂) − x·x̂
    LAPLACE   |r|·e^−θ + θ + log 2
    CONTINUOUS_BERNOULLI  softplus(x̂) − x·x̂ − log C(x̂), C(ℓ) = ℓ/tanh(ℓ/2) (2 at ℓ = 0), the
              normaliser of the continuous Bernoulli on logits ℓ = x̂ (Loaiza-Ganem &
              Cunningham 2019); computed as (½ − x)·ℓ + L(ℓ), L(ℓ) = log(sinh(ℓ/2)/(ℓ/2)), with
              ∂x = −ℓ, ∂x̂ = ½ − x + D(ℓ), D(ℓ) = L'(ℓ) = ½coth(ℓ/2) − 1/ℓ; L and D come from their
              Taylor series below |ℓ| = CB_SWITCH (fastvae._common) and closed forms above it.
"""
import math

import torch
import torch.nn.functional as F

from .._common import (CB_LOG_SERIES, CB_SERIES, CB_SWITCH, CB_TERMS, LOG_2, LOG_2PI, Likelihood,
                       Reduction, accumulation_dtype, decoder_views, in_given_shapes, reduce_rows,
                       sample_shape)
from .._philox import normal_stream

DEVICE_TYPES = ("cpu", "cuda")
RECORDS_AUTOGRAD = False


def _noise(seed, numel, dtype):
    return normal_stream(seed, numel).to(dtype)


def reparameterize_forward(mu, logvar, seed, n_samples):
    acc = accumulation_dtype(mu)
    eps = _noise(seed, n_samples * mu.numel(), acc).view(n_samples, mu.numel())
    sigma = torch.exp(0.5 * logvar.to(acc).reshape(-1))
    z = mu.to(acc).reshape(-1) + sigma * eps
    return z.to(mu.dtype).reshape(sample_shape(mu.shape, n_samples))


def reparameterize_backward(grad_z, logvar, seed, n_samples, need_mu, need_logvar):
    acc = accumulation_dtype(logvar)
    grad = grad_z.to(acc).view(n_samples, *logvar.shape)
    grad_mu = grad.sum(0).to(logvar.dtype) if need_mu else logvar.new_empty(0)
    if need_logvar:
        eps = _noise(seed, grad_z.numel(), acc).view(n_samples, *logvar.shape)
        half_sigma = 0.5 * torch.exp(0.5 * logvar.to(acc))
        grad_logvar = ((grad * eps).sum(0) * half_sigma).to(logvar.dtype)
    else:
        grad_logvar = logvar.new_empty(0)
    return grad_mu, grad_logvar


def _sum_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sum ``grad`` over the dims where ``shape`` has size 1 (undoing a broadcast)."""
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


# ----------------------------------------------------------------------------------------------
# per-element likelihoods: (nll, ∂x, ∂x̂, ∂θ) over [S, B, D]; θ is unused (None) by the Bernoullis
# ----------------------------------------------------------------------------------------------
def _gaussian(x, x_hat, theta):
    residual = x - x_hat
    grad_x = residual * torch.exp(-theta)
    scaled_square = residual * grad_x
    return 0.5 * (scaled_square + theta + LOG_2PI), grad_x, -grad_x, 0.5 * (1.0 - scaled_square)


def _bernoulli(x, x_hat, theta):
    return F.softplus(x_hat) - x * x_hat, -x_hat, torch.sigmoid(x_hat) - x, None


def _laplace(x, x_hat, theta):
    residual = x - x_hat
    inverse_scale = torch.exp(-theta)
    scaled_distance = residual.abs() * inverse_scale
    grad_x = torch.sign(residual) * inverse_scale
    return scaled_distance + theta + LOG_2, grad_x, -grad_x, 1.0 - scaled_distance


def _horner(s, coefficients):
    """Σ_k coefficients[k]·s^k."""
    total = torch.full_like(s, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        total = total * s + c
    return total


def _continuous_bernoulli(x, x_hat, theta):
    """(½ − x)·ℓ + L(ℓ) and ∂x̂ = ½ − x + D(ℓ), L and D as in the module docstring: below the
    switch the series in ℓ² (CB_TERMS of them), above it, with a = |ℓ| and e = e^−a,
    L = a/2 − log a + log1p(−e) and D = sign(ℓ)·((½ − 1/a) + e/(1 − e)). Each branch gets its
    argument clamped into its range, so the unused one stays finite."""
    terms = CB_TERMS[x_hat.dtype]
    near = x_hat.abs() < CB_SWITCH
    inner = x_hat.clamp(-CB_SWITCH, CB_SWITCH)
    square = inner * inner
    outer = x_hat.abs().clamp(min=CB_SWITCH)
    decay = torch.exp(-outer)
    log_ratio = torch.where(near, square * _horner(square, CB_LOG_SERIES[:terms]),
                            0.5 * outer - torch.log(outer) + torch.log1p(-decay))
    langevin = torch.where(near, inner * _horner(square, CB_SERIES[:terms]),
                           torch.sign(x_hat) * ((0.5 - 1.0 / outer) + decay / (1.0 - decay)))
    half_minus_x = 0.5 - x
    return half_minus_x * x_hat + log_ratio, -x_hat, half_minus_x + langevin, None


_LIKELIHOODS = {Likelihood.GAUSSIAN: _gaussian, Likelihood.BERNOULLI: _bernoulli,
                Likelihood.LAPLACE: _laplace,
                Likelihood.CONTINUOUS_BERNOULLI: _continuous_bernoulli}


def _nll_rows_and_grads(x, x_hat, theta, likelihood, weight):
    """NLL summed over D, ``[S, B]``, and the weighted per-element gradients of (x, x_hat,
    x_log_scale) over ``[S, B, D]`` (None for θ where the likelihood has none). The gradients
    are fresh tensors, weighted in place: this backend is also the fallback, and every B×D
    temporary costs a pass."""
    nll, *grads = _LIKELIHOODS[likelihood](x, x_hat, theta)
    return nll.sum(-1), [None if g is None else g.mul_(weight) for g in grads]


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


def _kl_term(kl_el, free_bits, acc):
    """Per-row KL term with free bits, and the 0/1 mask of active dims (None without)."""
    if free_bits <= 0:
        return kl_el.sum(-1), None
    active = (kl_el.mean(0) >= free_bits).to(acc)  # [d]
    return (kl_el * active).sum(-1) + (1.0 - active).sum() * free_bits, active


def _row_weights(grad_scale, reduction, batch, acc, device):
    if grad_scale is not None:
        return grad_scale.to(acc)
    uniform = 1.0 / max(batch, 1) if reduction == Reduction.MEAN else 1.0
    return torch.full((batch,), uniform, dtype=acc, device=device)


def _input_grad(grad, tensor, sum_samples):
    if sum_samples:  # x is shared by the S samples
        grad = grad.sum(0)
    return _sum_to(grad, tensor.shape).to(tensor.dtype).reshape(tensor.shape)


def _capacity_term(kl_term, capacity, acc):
    """(|KL_fb − C|, sign(KL_fb − C)) per row with a capacity C; (KL_fb, 1) without."""
    if capacity is None:
        return kl_term, 1.0
    excess = kl_term - capacity.to(acc)
    return excess.abs(), torch.sign(excess).view(-1, 1)


def elbo(x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar, beta, capacity, grad_scale,
         likelihood, x_log_scale_const, free_bits, reduction, needs_grad):
    acc = accumulation_dtype(x, x_hat, x_log_scale, mu)
    given = (x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar)
    x_hat, x_log_scale = decoder_views(x_hat, x_log_scale)
    n_samples, batch, _ = x_hat.shape
    inputs = (x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar)
    theta = (x_log_scale.to(acc) if x_log_scale is not None
             else torch.full((), x_log_scale_const, dtype=acc, device=x.device))
    weight = _row_weights(grad_scale, reduction, batch, acc, x.device)
    nll_rows, nll_grads = _nll_rows_and_grads(x.to(acc), x_hat.to(acc), theta, likelihood,
                                              (weight / n_samples).view(1, batch, 1))
    nll = nll_rows.sum(0) / n_samples

    kl_el, kl_grads = _kl_elements(*[t if t is None else t.to(acc)
                                     for t in (mu, logvar, prior_mu, prior_logvar)])
    kl_term, active = _kl_term(kl_el, free_bits, acc)
    kl_term, sign = _capacity_term(kl_term, capacity, acc)
    beta_a = beta.to(acc)
    loss = reduce_rows(nll + beta_a * kl_term, reduction)
    kl_weight = (beta_a * weight).view(batch, 1) * (1.0 if active is None else active) * sign

    grads = []
    for i, tensor in enumerate(inputs):
        if not needs_grad[i]:
            grads.append(x.new_empty(0))
        elif i < 3:
            grads.append(_input_grad(nll_grads[i], tensor, sum_samples=i == 0))
        else:
            grads.append(_input_grad(kl_grads[i - 3] * kl_weight, tensor, sum_samples=False))
    return (loss, nll, kl_el.sum(-1), kl_term, *in_given_shapes(grads, given, needs_grad))


def _log_density_ratio(z, mu, logvar, prior_mu, prior_logvar):
    """Per element of ``[S, B, d]``: log p(z) − log q(z|x) without the cancelling log 2π, and
    the derivatives of the negative bound's log weight, −∂(log p − log q), with respect to
    (z, mu, logvar, prior_mu, prior_logvar)."""
    q_residual = z - mu
    q_scaled = q_residual * torch.exp(-logvar)
    if prior_mu is None:
        p_residual, p_scaled, prior_logvar = z, z, torch.zeros((), dtype=z.dtype, device=z.device)
    else:
        p_residual = z - prior_mu
        p_scaled = p_residual * torch.exp(-prior_logvar)
    ratio = 0.5 * (q_residual * q_scaled + logvar - p_residual * p_scaled - prior_logvar)
    return ratio, (p_scaled - q_scaled, q_scaled, 0.5 * (q_residual * q_scaled - 1.0),
                   -p_scaled, -0.5 * (p_residual * p_scaled - 1.0))


def iwae(x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset,
         grad_scale, likelihood, x_log_scale_const, reduction, dreg, needs_grad):
    acc = accumulation_dtype(x, x_hat, x_log_scale, z)
    n_samples, batch, _ = x_hat.shape
    inputs = (x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset)
    theta = (x_log_scale.to(acc) if x_log_scale is not None
             else torch.full((), x_log_scale_const, dtype=acc, device=x.device))
    latents = [t if t is None else t.to(acc) for t in inputs[3:8]]
    ratio, latent_grads = _log_density_ratio(*latents)
    # The NLL gradients are weighted once the weights are known: w̃ needs every sample's NLL.
    nll_elements, *nll_grads = _LIKELIHOODS[likelihood](x.to(acc), x_hat.to(acc), theta)
    log_weights = ratio.sum(-1) - nll_elements.sum(-1)
    if log_weight_offset is not None:
        log_weights = log_weights + log_weight_offset.to(acc)
    log_total = torch.logsumexp(log_weights, 0)
    loss = reduce_rows(math.log(n_samples) - log_total, reduction)
    normalised = torch.exp(log_weights - log_total)
    sample_weight = _row_weights(grad_scale, reduction, batch, acc, x.device) * normalised
    weights = [sample_weight] * len(inputs)
    weights[3] = sample_weight * normalised if dreg else sample_weight
    grads = []
    for i, tensor in enumerate(inputs):
        if not needs_grad[i]:
            grads.append(x.new_empty(0))
        elif i == 8:
            grads.append((-sample_weight).to(tensor.dtype))
        else:
            elements = nll_grads[i] if i < 3 else latent_grads[i - 3]
            grads.append(_input_grad(elements * weights[i].unsqueeze(-1), tensor,
                                     sum_samples=i not in (1, 2, 3)))
    return (loss, log_weights, *grads)


def _component_terms(z, means, logvars):
    """[S, B, K, d]: (z − m_k)·e^−v_k and (z − m_k), for every component."""
    residual = z.unsqueeze(2) - means
    return residual * torch.exp(-logvars), residual


def mixture_log_ratio(z, mu, logvar, means, logvars, logits):
    acc = accumulation_dtype(z)
    z, mu, logvar, means, logvars, logits = (t.to(acc) for t in (z, mu, logvar, means, logvars,
                                                                  logits))
    q_residual = z - mu
    log_q = -0.5 * (q_residual * q_residual * torch.exp(-logvar) + logvar).sum(-1)
    scaled, residual = _component_terms(z, means, logvars)
    components = -0.5 * (scaled * residual + logvars).sum(-1)
    log_prior_sum = torch.logsumexp(logits + components, -1)
    return log_q - (log_prior_sum - torch.logsumexp(logits, 0)), log_prior_sum


def mixture_log_ratio_backward(grad, z, mu, logvar, means, logvars, logits, log_prior_sum,
                               needs_grad):
    acc = accumulation_dtype(z)
    inputs = (z, mu, logvar, means, logvars, logits)
    z_, mu_, logvar_, means_, logvars_, logits_ = (t.to(acc) for t in inputs)
    g = grad.to(acc).unsqueeze(-1)
    q_scaled = (z_ - mu_) * torch.exp(-logvar_)
    scaled, residual = _component_terms(z_, means_, logvars_)
    components = -0.5 * (scaled * residual + logvars_).sum(-1)
    responsibility = torch.exp(logits_ + components - log_prior_sum.to(acc).unsqueeze(-1))
    weighted = responsibility.unsqueeze(-1) * g.unsqueeze(-1)  # [S, B, K, 1]
    grads = (g * ((responsibility.unsqueeze(-1) * scaled).sum(2) - q_scaled),
             (g * q_scaled).sum(0),
             (g * 0.5 * (q_scaled * (z_ - mu_) - 1.0)).sum(0),
             -(weighted * scaled).sum((0, 1)),
             -(weighted * 0.5 * (scaled * residual - 1.0)).sum((0, 1)),
             -(g * (responsibility - torch.softmax(logits_, 0))).sum((0, 1)))
    return tuple(grad_.to(t.dtype) if need else z.new_empty(0)
                 for grad_, t, need in zip(grads, inputs, needs_grad))


def categorical(logits, target, grad_scale, classes_last, reduction, needs_grad):
    acc = accumulation_dtype(logits)
    n_samples, batch = logits.shape[:2]
    dim = 3 if classes_last else 2  # the class dim
    values = logits.to(acc)
    classes = values.shape[dim]
    index = target.long()
    valid = ((index >= 0) & (index < classes)).unsqueeze(0).unsqueeze(dim)
    # An out-of-range target is clamped for the gather only; its position becomes NaN below.
    index = index.clamp(0, classes - 1).unsqueeze(0).unsqueeze(dim)
    index = index.expand(n_samples, *index.shape[1:])
    log_total = torch.logsumexp(values, dim, keepdim=True)
    picked = torch.where(valid, log_total - values.gather(dim, index), math.nan)
    nll = picked.sum((2, 3)).sum(0) / n_samples
    loss = reduce_rows(nll.clone(), reduction)  # a tensor of its own, also for 'none'
    if not needs_grad[0]:
        return loss, nll, logits.new_empty(0)
    weight = _row_weights(grad_scale, reduction, batch, acc, logits.device) / n_samples
    grad = torch.exp(values - log_total).scatter_add_(dim, index, valid.to(acc).neg().expand(
        index.shape))
    grad = torch.where(valid, grad.mul_(weight.view(1, batch, 1, 1)), math.nan)
    return loss, nll, grad.to(logits.dtype)


def scale_(grads, upstream):
    """In place; plain PyTorch reads the scalar on the host only for a CPU upstream."""
    if upstream.device.type == "cpu" and upstream.dim() == 0 and upstream.item() == 1.0:
        return
    for grad in grads:
        factor = upstream.to(accumulation_dtype(grad))
        grad.copy_(grad.to(factor.dtype) * (factor.view(1, -1, 1) if factor.dim() else factor))
