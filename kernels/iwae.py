"""The importance-weighted bound (Burda et al. 2016): log weights, bound and every requested
gradient in one launch.

Work layout (all reductions deterministic: fixed-order sums, no atomics):

* ``_iwae_kernel`` runs a persistent grid over rows: program g visits the datapoints
  g, g + G, …. A row's S samples are streamed in chunks of ``BLOCK_S`` (S is no block size, so
  S = 5000 costs 5000 / BLOCK_S chunks, not registers).
* Sweep 1, per chunk of samples: Σ_D nll (in ``BLOCK_D`` event tiles) and Σ_d of
  log p(z) − log q(z|x) (in ``BLOCK_L`` latent tiles) give the log weights, which are stored
  and folded into an online log-sum-exp (a running max, and the sum of exp(log w − max)): the
  row's bound.
* Sweep 2, only where a gradient is wanted, re-reads the row's samples tile by tile (in cache
  on a GPU) with the weights a = ω_b·w̃ read back from the stored log weights: per element for
  x̂, z and the offset, summed over the samples in registers for x, mu, logvar and a per-row
  prior.
* An input shared by the rows (θ with Bl = 1, a prior with Bp = 1) has its gradient summed in
  per-program partials: a program's first row stores, its later rows add to what is there.
  θ's broadcast over D goes to per-event-tile partials, so the partials have ``elbo``'s layout
  ``[G, T, Sl, Bl, Dl]``; the launcher sums them in order.

Inputs and gradient targets are 9-tuples in slot order (``fastvae._common.IWAE_INPUTS``); a None
entry is absent (an input) or not wanted (a gradient), branched on at compile time. Slots 0–2
are ``elbo``'s, so its event helpers (loads, θ's strides and partial layout) serve here too.
"""
import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from .._common import Reduction, accumulation_dtype, reduce_rows
from ._convert import widen
from ._launch import LaunchConfig, launch, resident_programs, tunable, warp_stage_candidates
from .elbo import (_event_terms, _gradient, _gradient_targets, _row_weight, _store,
                   _theta_layout, _theta_partial_start, _theta_strides)

# Elements per tile (BLOCK_S samples × BLOCK_D events or BLOCK_L latents), run by 4 warps: 8
# elements per thread, as in elbo's event tiles.
_TILE = 1024
_WARPS = 4
_MIN_BLOCK = 16


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _samples(first, BLOCK_S: tl.constexpr):
    """The chunk of samples from ``first``, as a column ``[BLOCK_S, 1]``."""
    return first + tl.arange(0, BLOCK_S)[:, None].to(tl.int64)


@triton.jit
def _tile(tile, BLOCK: tl.constexpr):
    """The elements of tile ``tile``, as a row ``[1, BLOCK]``."""
    return tl.cast(tile, tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]


@triton.jit
def _theta_offset(row, sample, event, sizes, THETA_FULL: tl.constexpr):
    """Offset of (sample, row, event) in θ ``[Sl, Bl, Dl]``, or in one slice of its partials."""
    stride_sample, stride_row = _theta_strides(sizes[0], sizes[2], THETA_FULL)
    offset = sample * stride_sample + row * stride_row
    if THETA_FULL[2]:
        offset += event
    return offset


@triton.jit
def _latent_terms(inputs, row, sample, latent, valid, sizes, PRIOR_PER_ROW: tl.constexpr,
                  ACC: tl.constexpr):
    """Per element of samples × latents of one row: log p(z) − log q(z|x) without the
    cancelling log 2π; the pieces of its gradients, (z − μ), (z − μ)e^−λ, (z − m), (z − m)e^−v
    (m = v = 0 for the standard prior); and the offset of z."""
    batch, latent_size = sizes[0], sizes[3]
    in_latent = latent < latent_size
    offset = row * latent_size + latent
    z_offset = (sample * batch + row) * latent_size + latent
    z = widen(tl.load(inputs[3] + z_offset, mask=valid, other=0.0), ACC)
    logvar = widen(tl.load(inputs[5] + offset, mask=in_latent, other=0.0), ACC)
    q_residual = z - widen(tl.load(inputs[4] + offset, mask=in_latent, other=0.0), ACC)
    q_scaled = q_residual * tl.exp(-logvar)
    if inputs[6] is None:
        p_residual, p_scaled, prior_logvar = z, z, 0.0
    else:
        prior_offset = offset if PRIOR_PER_ROW else latent
        prior_logvar = widen(tl.load(inputs[7] + prior_offset, mask=in_latent, other=0.0), ACC)
        p_residual = z - widen(tl.load(inputs[6] + prior_offset, mask=in_latent, other=0.0), ACC)
        p_scaled = p_residual * tl.exp(-prior_logvar)
    ratio = 0.5 * (q_residual * q_scaled + logvar - p_residual * p_scaled - prior_logvar)
    return ratio, q_residual, q_scaled, p_residual, p_scaled, z_offset


# ----------------------------------------------------------------------------------------------
# sweep 1: the log weights and their log-sum-exp
# ----------------------------------------------------------------------------------------------
@triton.jit
def _log_weight(inputs, row, sample, in_samples, sizes, theta_const, LIKELIHOOD: tl.constexpr,
                THETA_FULL: tl.constexpr, PRIOR_PER_ROW: tl.constexpr, ACC: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """log w of the samples ``sample`` (a column) of one row: Σ_d log p/q − Σ_D nll + offset."""
    latent_size, event_size = sizes[3], sizes[2]
    log_ratio = tl.zeros(sample.shape, ACC)
    for tile in range(tl.cdiv(latent_size, BLOCK_L)):
        latent = _tile(tile, BLOCK_L)
        valid = in_samples & (latent < latent_size)
        ratio = _latent_terms(inputs, row, sample, latent, valid, sizes, PRIOR_PER_ROW, ACC)[0]
        log_ratio += tl.sum(tl.where(valid, ratio, 0.0), axis=1, keep_dims=True)
    nll = tl.zeros(sample.shape, ACC)
    for tile in range(tl.cdiv(event_size, BLOCK_D)):
        event = _tile(tile, BLOCK_D)
        valid = in_samples & (event < event_size)
        theta_offset = _theta_offset(row, sample, event, sizes, THETA_FULL)
        element_terms = _event_terms(inputs, row, sample, event, valid, theta_offset, sizes,
                                     theta_const, LIKELIHOOD, ACC)
        nll += tl.sum(tl.where(valid, element_terms[0], 0.0), axis=1, keep_dims=True)
    log_weight = log_ratio - nll
    if inputs[8] is not None:
        log_weight += widen(tl.load(inputs[8] + sample * sizes[0] + row, mask=in_samples,
                                    other=0.0), ACC)
    return log_weight


@triton.jit
def _online_logsumexp(running_max, running_sum, log_weight):
    """Folds a chunk of log weights into the running max and the sum of exp(log w − max)."""
    new_max = tl.maximum(running_max, tl.max(log_weight))
    # While every log weight is −inf, shift by 0: the terms are then 0 rather than NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(log_weight - shift))
    return new_max, running_sum


@triton.jit
def _log_weights(inputs, log_weights_ptr, row, sizes, theta_const, LIKELIHOOD: tl.constexpr,
                 THETA_FULL: tl.constexpr, PRIOR_PER_ROW: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Sweep 1 over the samples of one row: stores ``log_weights[:, row]``, returns their
    log-sum-exp."""
    batch, n_samples = sizes[0], sizes[1]
    running_max = tl.full((), float("-inf"), ACC)
    running_sum = tl.zeros((), ACC)
    for first in range(0, n_samples, BLOCK_S):
        sample = _samples(first, BLOCK_S)
        in_samples = sample < n_samples
        log_weight = _log_weight(inputs, row, sample, in_samples, sizes, theta_const, LIKELIHOOD,
                                 THETA_FULL, PRIOR_PER_ROW, ACC, BLOCK_D, BLOCK_L)
        tl.store(log_weights_ptr + sample * batch + row, log_weight, mask=in_samples)
        running_max, running_sum = _online_logsumexp(
            running_max, running_sum, tl.where(in_samples, log_weight, float("-inf")))
    return running_max + tl.log(running_sum)


# ----------------------------------------------------------------------------------------------
# sweep 2: the gradients, for the weights a = ω_b·w̃
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sample_weights(log_weights_ptr, sample, in_samples, row, softmax):
    """(a, w̃) of the samples ``sample`` of one row, from the stored log weights:
    w̃ = exp(log w − lse), a = ω_b·w̃; ``softmax`` = (B, lse, ω_b)."""
    batch, log_total, weight = softmax
    log_weight = tl.load(log_weights_ptr + sample * batch + row, mask=in_samples,
                         other=float("-inf"))
    normalised = tl.exp(log_weight - log_total)
    return weight * normalised, normalised


@triton.jit
def _store_summed(ptr, offset, value, mask, row, SHARED: tl.constexpr):
    """``_store``; for an input SHARED by the rows, ``ptr`` is the program's partial and the
    value is added to what the program's earlier rows left there (its first row stores)."""
    if SHARED:
        if ptr is not None:
            # (tl.where: the interpreter makes a vector & a scalar mask an integer array)
            later_row = tl.where(row >= tl.num_programs(0), mask, False)
            value += tl.load(ptr + offset, mask=later_row, other=0.0)
    _store(ptr, offset, value, mask)


@triton.jit
def _column_sum(value, valid):
    """Σ over the chunk's samples of the valid elements, as a row ``[1, BLOCK]``."""
    return tl.sum(tl.where(valid, value, 0.0), axis=0, keep_dims=True)


@triton.jit
def _event_chunk(inputs, grads, log_weights_ptr, row, softmax, sample, event, theta_start,
                 sizes, theta_const, LIKELIHOOD: tl.constexpr, THETA_FULL: tl.constexpr,
                 ACC: tl.constexpr):
    """A chunk of samples × an event tile: x̂'s gradient (and θ's where θ has all S) stored;
    returns x's gradient summed over the chunk's samples, and θ's summed over the chunk's
    samples and the dims θ is broadcast along (except B, which ``_store_summed`` handles)."""
    in_samples = sample < sizes[1]
    valid = in_samples & (event < sizes[2])
    a = _sample_weights(log_weights_ptr, sample, in_samples, row, softmax)[0]
    theta_offset = _theta_offset(row, sample, event, sizes, THETA_FULL)
    _, d_x, d_x_hat, d_theta, hat_offset = _event_terms(
        inputs, row, sample, event, valid, theta_offset, sizes, theta_const, LIKELIHOOD, ACC)
    _store(grads[1], hat_offset, d_x_hat * a, valid)
    d_theta = tl.where(valid, d_theta * a, 0.0)
    if not THETA_FULL[2]:
        d_theta = tl.sum(d_theta, axis=1, keep_dims=True)
    if THETA_FULL[0]:
        theta_valid = valid if THETA_FULL[2] else in_samples
        _store_summed(grads[2], theta_start + theta_offset, d_theta, theta_valid, row,
                      not THETA_FULL[1])
    return _column_sum(d_x * a, valid), tl.sum(d_theta, axis=0, keep_dims=True)


@triton.jit
def _event_gradients(inputs, grads, log_weights_ptr, row, softmax, sizes, theta_const,
                     LIKELIHOOD: tl.constexpr, THETA_FULL: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sweep 2 over the event tiles of one row: x̂'s gradient per element, x's summed over the
    samples, θ's summed over the dims θ is broadcast along (B and D into partials)."""
    batch, n_samples, event_size = sizes[0], sizes[1], sizes[2]
    THETA_D: tl.constexpr = BLOCK_D if THETA_FULL[2] else 1
    for tile in range(tl.cdiv(event_size, BLOCK_D)):
        event = _tile(tile, BLOCK_D)
        theta_start = _theta_partial_start(tl.program_id(0), tile, n_samples, batch, event_size,
                                           THETA_FULL, BLOCK_D)
        grad_x = tl.zeros((1, BLOCK_D), ACC)
        grad_theta = tl.zeros((1, THETA_D), ACC)  # over the samples, where θ has one
        for first in range(0, n_samples, BLOCK_S):
            chunk_x, chunk_theta = _event_chunk(
                inputs, grads, log_weights_ptr, row, softmax, _samples(first, BLOCK_S), event,
                theta_start, sizes, theta_const, LIKELIHOOD, THETA_FULL, ACC)
            grad_x += chunk_x
            if not THETA_FULL[0]:
                grad_theta += chunk_theta
        in_event = event < event_size
        _store(grads[0], row * event_size + event, grad_x, in_event)
        if not THETA_FULL[0]:
            theta_valid = in_event if THETA_FULL[2] else tl.full((1, 1), True, tl.int1)
            theta_offset = _theta_offset(row, _samples(0, 1), event, sizes, THETA_FULL)
            _store_summed(grads[2], theta_start + theta_offset, grad_theta, theta_valid, row,
                          not THETA_FULL[1])


@triton.jit
def _latent_chunk(inputs, grads, log_weights_ptr, row, softmax, sample, latent, sizes,
                  PRIOR_PER_ROW: tl.constexpr, DREG: tl.constexpr, ACC: tl.constexpr):
    """A chunk of samples × a latent tile: z's gradient stored; returns the gradients of mu,
    logvar, prior_mu and prior_logvar summed over the chunk's samples."""
    in_samples = sample < sizes[1]
    valid = in_samples & (latent < sizes[3])
    a, normalised = _sample_weights(log_weights_ptr, sample, in_samples, row, softmax)
    _, q_residual, q_scaled, p_residual, p_scaled, z_offset = _latent_terms(
        inputs, row, sample, latent, valid, sizes, PRIOR_PER_ROW, ACC)
    # DReG (Tucker et al. 2018): z's weight is ω_b·w̃², the score-function part being dropped.
    z_weight = a * normalised if DREG else a
    _store(grads[3], z_offset, (p_scaled - q_scaled) * z_weight, valid)
    return (_column_sum(q_scaled * a, valid),
            _column_sum(0.5 * (q_residual * q_scaled - 1.0) * a, valid),
            _column_sum(-p_scaled * a, valid),
            _column_sum(-0.5 * (p_residual * p_scaled - 1.0) * a, valid))


@triton.jit
def _latent_gradients(inputs, grads, log_weights_ptr, row, softmax, sizes,
                      PRIOR_PER_ROW: tl.constexpr, DREG: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr):
    """Sweep 2 over the latent tiles of one row: z's gradient per element, the others summed
    over the samples (a shared prior's into the program's partial)."""
    latent_size = sizes[3]
    for tile in range(tl.cdiv(latent_size, BLOCK_L)):
        latent = _tile(tile, BLOCK_L)
        grad_mu = tl.zeros((1, BLOCK_L), ACC)
        grad_logvar = tl.zeros((1, BLOCK_L), ACC)
        grad_prior_mu = tl.zeros((1, BLOCK_L), ACC)
        grad_prior_logvar = tl.zeros((1, BLOCK_L), ACC)
        for first in range(0, sizes[1], BLOCK_S):
            d_mu, d_logvar, d_prior_mu, d_prior_logvar = _latent_chunk(
                inputs, grads, log_weights_ptr, row, softmax, _samples(first, BLOCK_S), latent,
                sizes, PRIOR_PER_ROW, DREG, ACC)
            grad_mu += d_mu
            grad_logvar += d_logvar
            grad_prior_mu += d_prior_mu
            grad_prior_logvar += d_prior_logvar
        in_latent = latent < latent_size
        offset = row * latent_size + latent
        _store(grads[4], offset, grad_mu, in_latent)
        _store(grads[5], offset, grad_logvar, in_latent)
        prior_offset = offset if PRIOR_PER_ROW else (
            tl.program_id(0).to(tl.int64) * latent_size + latent)
        _store_summed(grads[6], prior_offset, grad_prior_mu, in_latent, row, not PRIOR_PER_ROW)
        _store_summed(grads[7], prior_offset, grad_prior_logvar, in_latent, row,
                      not PRIOR_PER_ROW)


@triton.jit
def _offset_gradient(grad_ptr, log_weights_ptr, row, softmax, n_samples, BLOCK_S: tl.constexpr):
    """−a of every sample of one row."""
    for first in range(0, n_samples, BLOCK_S):
        sample = _samples(first, BLOCK_S)
        in_samples = sample < n_samples
        a = _sample_weights(log_weights_ptr, sample, in_samples, row, softmax)[0]
        _store(grad_ptr, sample * softmax[0] + row, -a, in_samples)


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
@tunable(key=["sizes"], candidates=warp_stage_candidates())
@triton.jit
def _iwae_kernel(inputs, grads, log_weights_ptr, loss_rows_ptr, grad_scale_ptr, sizes,
                 theta_const: tl.float64, uniform_weight: tl.float64, log_samples: tl.float64,
                 LIKELIHOOD: tl.constexpr, THETA_FULL: tl.constexpr, PRIOR_PER_ROW: tl.constexpr,
                 DREG: tl.constexpr, SWEEP_2: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """``inputs``, ``grads``: 9-tuples in slot order (see the module docstring); ``sizes``:
    (B, S, D, d); ``SWEEP_2``: whether sweep 2 visits the (event, latent) tiles."""
    batch = sizes[0]
    for row_index in range(tl.program_id(0), batch, tl.num_programs(0)):
        row = tl.cast(row_index, tl.int64)
        log_total = _log_weights(inputs, log_weights_ptr, row, sizes, theta_const, LIKELIHOOD,
                                 THETA_FULL, PRIOR_PER_ROW, ACC, BLOCK_S, BLOCK_D, BLOCK_L)
        tl.store(loss_rows_ptr + row, tl.full((), log_samples, ACC) - log_total)
        # Sweep 2 reads log weights other threads stored, and the partials the previous row's
        # sweep 2 left: both must be visible to the whole program.
        tl.debug_barrier()
        softmax = (batch, log_total, _row_weight(grad_scale_ptr, row, True, uniform_weight, ACC))
        if SWEEP_2[0]:
            _event_gradients(inputs, grads, log_weights_ptr, row, softmax, sizes, theta_const,
                             LIKELIHOOD, THETA_FULL, ACC, BLOCK_S, BLOCK_D)
        if SWEEP_2[1]:
            _latent_gradients(inputs, grads, log_weights_ptr, row, softmax, sizes,
                              PRIOR_PER_ROW, DREG, ACC, BLOCK_S, BLOCK_L)
        if grads[8] is not None:
            _offset_gradient(grads[8], log_weights_ptr, row, softmax, sizes[1], BLOCK_S)


# ----------------------------------------------------------------------------------------------
# the launcher
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the shapes decide about one launch; built once per shape class (cached). Its
    ``runs``, ``partial_dims`` and fields serve elbo's ``_gradient_targets`` and ``_gradient``."""
    acc: torch.dtype
    groups: int              # programs of the persistent grid over rows (0 when B = 0)
    event_tiles: int         # event tiles of a row; 0: no event gradient (B = 0 or D = 0)
    latent_tiles: int        # latent tiles of a row; 0: no latent gradient (B = 0 or d = 0)
    theta_full: tuple        # (S, B, D): whether θ has that dim in full
    theta_partial: tuple     # shape θ's gradient is summed in, () when it goes to the output
    prior_per_row: bool
    main: LaunchConfig

    @property
    def acc_type(self):
        return tl.float64 if self.acc == torch.float64 else tl.float32

    def runs(self, slot: int) -> bool:
        """Whether the kernel writes gradient slot ``slot`` (else it is a sum over nothing)."""
        if slot < 3:
            return self.event_tiles > 0
        return (self.latent_tiles if slot < 8 else self.groups) > 0

    def partial_dims(self, slot: int) -> tuple:
        """The dims of slot's target summed into its gradient after the kernel; () where the
        kernel writes the gradient itself."""
        if slot == 2 and self.theta_partial:
            return (0, 1)
        return (0,) if slot in (6, 7) and not self.prior_per_row else ()


def _blocks(n_samples: int, event_size: int, latent_size: int) -> dict:
    """BLOCK_D: D up to a whole tile; BLOCK_S: the samples that fit beside it (S itself is
    streamed); BLOCK_L: the latents that fit beside those samples."""
    block_d = max(_MIN_BLOCK, min(triton.next_power_of_2(max(event_size, 1)), _TILE))
    block_s = max(1, min(triton.next_power_of_2(n_samples), _TILE // block_d))
    block_l = max(_MIN_BLOCK, min(triton.next_power_of_2(max(latent_size, 1)),
                                  _TILE // block_s))
    return dict(BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_L=block_l)


@functools.lru_cache(maxsize=512)
def _plan(n_samples, batch, event_size, latent_size, theta_shape, prior_rows, acc,
          programs) -> _Plan:
    blocks = _blocks(n_samples, event_size, latent_size)
    event_tiles = -(-event_size // blocks["BLOCK_D"]) if batch else 0
    latent_tiles = -(-latent_size // blocks["BLOCK_L"]) if batch else 0
    groups = min(batch, programs)
    full, partial = _theta_layout(theta_shape, (n_samples, batch, event_size), groups,
                                  event_tiles)
    return _Plan(acc, groups, event_tiles, latent_tiles, full, partial, prior_rows == batch,
                 LaunchConfig(blocks, _WARPS))


def _launch(plan, inputs, targets, outputs, grad_scale, sizes, likelihood, theta_const,
            reduction, dreg):
    """``outputs``: (log_weights, loss_rows)."""
    uniform_weight = 1.0 / sizes[0] if reduction == Reduction.MEAN else 1.0
    sweep_2 = (any(t is not None for t in targets[:3]),
               any(t is not None for t in targets[3:8]))
    launch(_iwae_kernel, (plan.groups,), plan.main, inputs, targets, *outputs, grad_scale, sizes,
           float(theta_const), uniform_weight, math.log(sizes[1]), LIKELIHOOD=int(likelihood),
           THETA_FULL=plan.theta_full, PRIOR_PER_ROW=plan.prior_per_row, DREG=bool(dreg),
           SWEEP_2=sweep_2, ACC=plan.acc_type)


def iwae(x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset,
         grad_scale, likelihood, x_log_scale_const, reduction, dreg, needs_grad):
    """The importance-weighted bound; arguments, shapes and outputs as the reference backend's
    ``iwae``."""
    inputs = (x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset)
    n_samples, batch, event_size = x_hat.shape
    sizes = (batch, n_samples, event_size, z.shape[2])
    plan = _plan(n_samples, batch, event_size, z.shape[2],
                 None if x_log_scale is None else tuple(x_log_scale.shape),
                 None if prior_mu is None else prior_mu.shape[0],
                 accumulation_dtype(x, x_hat, x_log_scale, z), resident_programs(x.device))
    needs_grad = [bool(need) for need in needs_grad]
    targets = _gradient_targets(inputs, needs_grad, plan)
    outputs = (x.new_empty((n_samples, batch), dtype=plan.acc),
               x.new_empty(batch, dtype=plan.acc))
    if plan.groups:
        _launch(plan, inputs, targets, outputs, grad_scale, sizes, likelihood, x_log_scale_const,
                reduction, dreg)
    grads = [_gradient(tensor, target, need, slot, plan, x)
             for slot, (tensor, target, need) in enumerate(zip(inputs, targets, needs_grad))]
    return (reduce_rows(outputs[1], reduction), outputs[0], *grads)
