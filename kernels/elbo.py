"""The fused VAE loss: NLL, KL, free bits, β and every requested gradient in one launch.

Work layout (all reductions deterministic: fixed partial buffers summed in a fixed order):

* ``_elbo_kernel`` runs on a grid ``(groups, event tiles + latent tiles)``. Program
  ``(g, t)`` visits the datapoints ``g, g + groups, …`` (a persistent grid over rows). An event
  tile is all S samples × ``BLOCK_D`` event elements of one datapoint: it writes the
  per-element gradients of x, x_hat (and a per-element x_logvar) and the tile's NLL sum to
  ``nll_partial[t, b]``. A latent tile covers ``BLOCK_L`` latent dims of ``ROWS_L`` datapoints:
  it writes the KL gradients and the tile's KL sums.
* Gradients of inputs broadcast over B (x_logvar with Bl=1, a prior with Bp=1) are summed over
  the rows of a group in registers and stored once per group; those broadcast over D are
  stored once per event tile. The launcher sums those partials over groups and tiles.
* Free bits need the batch-mean KL of every latent dim before the loss: ``_kl_column_kernel``
  writes per-group column sums first, which the latent tiles add up in group order.
* ``_elbo_rows_kernel`` adds the per-tile partials of every row into nll, kl, kl_term and
  ``nll + β·kl_term``.
"""
import math

import torch
import triton
import triton.language as tl

from ..reference import reduce_rows
from ._convert import narrow, widen
from ._launch import (accumulation_type, resident_programs, torch_accumulation_dtype,
                      tuning_configs, warp_stage_configs)

LOG_2PI = tl.constexpr(math.log(2.0 * math.pi))

# Elements per event tile (S × BLOCK_D) and per latent tile (ROWS_L × BLOCK_L): large enough
# for wide vector loads, small enough to stay in registers with 4-8 warps.
_EVENT_TILE = 1024
_LATENT_TILE = 512
_MIN_BLOCK = 16
_ROWS_BLOCK = 128  # rows per program of the final per-row pass


@triton.jit
def _log1p(t):
    """log(1 + t), accurate for small t without libdevice: log(u)·t/(u−1) with u = 1 + t."""
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _weights(grad_scale_ptr, row, in_batch, uniform_weight, HAS_GRAD_SCALE: tl.constexpr,
             ACC: tl.constexpr):
    """w_b: ``grad_scale[row]``, else the uniform 1/B ('mean') or 1."""
    if HAS_GRAD_SCALE:
        return widen(tl.load(grad_scale_ptr + row, mask=in_batch, other=0.0), ACC)
    else:
        return tl.full((), uniform_weight, ACC)


@triton.jit
def _event_tile(x_ptr, x_hat_ptr, x_logvar_ptr, grad_scale_ptr,
                grad_x_ptr, grad_x_hat_ptr, grad_x_logvar_ptr, nll_partial_ptr,
                group, tile, num_groups, batch, event_size, n_samples,
                x_logvar_const, uniform_weight,
                lv_stride_s, lv_stride_b, glv_stride_group, glv_stride_tile, glv_stride_s,
                glv_stride_b,
                BERNOULLI: tl.constexpr, HAS_X_LOGVAR: tl.constexpr,
                HAS_GRAD_SCALE: tl.constexpr, NEED_X: tl.constexpr, NEED_X_HAT: tl.constexpr,
                NEED_X_LOGVAR: tl.constexpr, LV_PER_SAMPLE: tl.constexpr,
                LV_PER_ROW: tl.constexpr, LV_PER_EVENT: tl.constexpr, ACC: tl.constexpr,
                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    tile = tile.to(tl.int64)
    sample = tl.arange(0, BLOCK_S)[:, None].to(tl.int64)
    event = tile * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    in_event = event < event_size
    valid = (sample < n_samples) & in_event

    # The x_logvar gradient after summing over the dims it is broadcast along.
    LV_S: tl.constexpr = BLOCK_S if LV_PER_SAMPLE else 1
    LV_E: tl.constexpr = BLOCK_D if LV_PER_EVENT else 1
    lv_sample = tl.arange(0, LV_S)[:, None].to(tl.int64)
    lv_grad_offset = lv_sample * glv_stride_s + tile * glv_stride_tile
    lv_grad_valid = lv_sample < n_samples
    if LV_PER_EVENT:
        lv_grad_offset += event
        lv_grad_valid = lv_grad_valid & in_event
    lv_grad_columns = tl.zeros((LV_S, LV_E), ACC)  # summed over rows when Bl = 1

    if not HAS_X_LOGVAR:
        x_logvar = tl.full((), x_logvar_const, ACC)
    for row_index in range(group, batch, num_groups):
        row = tl.cast(row_index, tl.int64)
        x = widen(tl.load(x_ptr + row * event_size + event, mask=in_event, other=0.0), ACC)
        hat_offset = (sample * batch + row) * event_size + event
        x_hat = widen(tl.load(x_hat_ptr + hat_offset, mask=valid, other=0.0), ACC)
        if HAS_X_LOGVAR:
            lv_offset = sample * lv_stride_s + row * lv_stride_b
            if LV_PER_EVENT:
                lv_offset += event
            x_logvar = widen(tl.load(x_logvar_ptr + lv_offset, mask=valid, other=0.0), ACC)
        if BERNOULLI:
            decay = tl.exp(-tl.abs(x_hat))
            nll = tl.maximum(x_hat, 0.0) + _log1p(decay) - x * x_hat
            sigmoid = tl.where(x_hat >= 0.0, 1.0 / (1.0 + decay), decay / (1.0 + decay))
            d_x = -x_hat
            d_x_hat = sigmoid - x
        else:
            residual = x - x_hat
            precision = tl.exp(-x_logvar)
            scaled_sq = residual * residual * precision
            nll = 0.5 * (scaled_sq + x_logvar + LOG_2PI)
            d_x = residual * precision
            d_x_hat = -d_x
        nll_sum = tl.sum(tl.sum(tl.where(valid, nll, 0.0), axis=1), axis=0)
        tl.store(nll_partial_ptr + tile * batch + row, nll_sum)

        nll_weight = _weights(grad_scale_ptr, row, True, uniform_weight, HAS_GRAD_SCALE,
                              ACC) / n_samples
        if NEED_X_HAT:
            tl.store(grad_x_hat_ptr + hat_offset,
                     narrow(d_x_hat * nll_weight, grad_x_hat_ptr.dtype.element_ty), mask=valid)
        if NEED_X:
            grad_x = tl.sum(tl.where(valid, d_x * nll_weight, 0.0), axis=0, keep_dims=True)
            tl.store(grad_x_ptr + row * event_size + event,
                     narrow(grad_x, grad_x_ptr.dtype.element_ty), mask=in_event)
        if NEED_X_LOGVAR:
            grad_lv = tl.where(valid, 0.5 * (1.0 - scaled_sq) * nll_weight, 0.0)
            if not LV_PER_SAMPLE:
                grad_lv = tl.sum(grad_lv, axis=0, keep_dims=True)
            if not LV_PER_EVENT:
                grad_lv = tl.sum(grad_lv, axis=1, keep_dims=True)
            if LV_PER_ROW:
                tl.store(grad_x_logvar_ptr + lv_grad_offset + row * glv_stride_b,
                         narrow(grad_lv, grad_x_logvar_ptr.dtype.element_ty), mask=lv_grad_valid)
            else:
                lv_grad_columns += grad_lv
    if NEED_X_LOGVAR and not LV_PER_ROW:
        tl.store(grad_x_logvar_ptr + lv_grad_offset + group.to(tl.int64) * glv_stride_group,
                 narrow(lv_grad_columns, grad_x_logvar_ptr.dtype.element_ty), mask=lv_grad_valid)


@triton.jit
def _standard_normal_kl(mu, logvar):
    var = tl.exp(logvar)
    return 0.5 * (mu * mu + var - 1.0 - logvar), mu, 0.5 * (var - 1.0)


@triton.jit
def _gaussian_prior_kl(mu, logvar, prior_mu, prior_logvar):
    """KL, ∂μ, ∂lv and ∂lv_p (∂μ_p = −∂μ) for a diagonal Gaussian prior."""
    var = tl.exp(logvar)
    diff = mu - prior_mu
    inv_prior_var = tl.exp(-prior_logvar)
    spread = (var + diff * diff) * inv_prior_var
    kl = 0.5 * (prior_logvar - logvar + spread - 1.0)
    return kl, diff * inv_prior_var, 0.5 * (var * inv_prior_var - 1.0), 0.5 * (1.0 - spread)


@triton.jit
def _latent_rows(row_block, ROWS_L: tl.constexpr):
    return tl.cast(row_block, tl.int64) * ROWS_L + tl.arange(0, ROWS_L)[:, None]


@triton.jit
def _latent_columns(tile, BLOCK_L: tl.constexpr):
    return tile.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]


@triton.jit
def _load_latents(mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, offset, latent, valid,
                  HAS_PRIOR: tl.constexpr, PRIOR_PER_ROW: tl.constexpr, ACC: tl.constexpr):
    mu = widen(tl.load(mu_ptr + offset, mask=valid, other=0.0), ACC)
    logvar = widen(tl.load(logvar_ptr + offset, mask=valid, other=0.0), ACC)
    if HAS_PRIOR:
        prior_offset = offset if PRIOR_PER_ROW else latent
        prior_mu = widen(tl.load(prior_mu_ptr + prior_offset, mask=valid, other=0.0), ACC)
        prior_logvar = widen(tl.load(prior_logvar_ptr + prior_offset, mask=valid, other=0.0), ACC)
    else:
        prior_mu = mu  # unused without a prior
        prior_logvar = logvar
    return mu, logvar, prior_mu, prior_logvar


@triton.jit
def _kl_column_kernel(kl_columns_ptr, mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr,
                      batch, latent_size, HAS_PRIOR: tl.constexpr, PRIOR_PER_ROW: tl.constexpr,
                      ACC: tl.constexpr, ROWS_L: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per-group column sums of the KL over datapoints (for free bits): ``[groups, d]``."""
    group = tl.program_id(0)
    tile = tl.program_id(1)
    latent = _latent_columns(tile, BLOCK_L)
    in_latent = latent < latent_size
    column_sum = tl.zeros((1, BLOCK_L), ACC)
    for row_block in range(group, tl.cdiv(batch, ROWS_L), tl.num_programs(0)):
        row = _latent_rows(row_block, ROWS_L)
        valid = (row < batch) & in_latent
        mu, logvar, prior_mu, prior_logvar = _load_latents(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, row * latent_size + latent,
            latent, valid, HAS_PRIOR, PRIOR_PER_ROW, ACC)
        if HAS_PRIOR:
            kl = _gaussian_prior_kl(mu, logvar, prior_mu, prior_logvar)[0]
        else:
            kl = _standard_normal_kl(mu, logvar)[0]
        column_sum += tl.sum(tl.where(valid, kl, 0.0), axis=0, keep_dims=True)
    tl.store(kl_columns_ptr + group.to(tl.int64) * latent_size + latent, column_sum,
             mask=in_latent)


@triton.jit
def _latent_tile(mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, grad_scale_ptr, beta_ptr,
                 kl_columns_ptr, grad_mu_ptr, grad_logvar_ptr, grad_prior_mu_ptr,
                 grad_prior_logvar_ptr, kl_partial_ptr, kl_term_partial_ptr,
                 group, tile, num_groups, batch, latent_size, num_column_groups,
                 free_bits, uniform_weight,
                 HAS_PRIOR: tl.constexpr, PRIOR_PER_ROW: tl.constexpr, FREE_BITS: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, NEED_MU: tl.constexpr,
                 NEED_LOGVAR: tl.constexpr, NEED_PRIOR_MU: tl.constexpr,
                 NEED_PRIOR_LOGVAR: tl.constexpr, ACC: tl.constexpr, ROWS_L: tl.constexpr,
                 BLOCK_L: tl.constexpr):
    latent = _latent_columns(tile, BLOCK_L)
    in_latent = latent < latent_size
    beta = widen(tl.load(beta_ptr), ACC)
    if FREE_BITS:
        floor = tl.full((), free_bits, ACC)
        column_sum = tl.zeros((1, BLOCK_L), ACC)
        for column_group in range(num_column_groups):  # in group order on every program
            column_sum += tl.load(kl_columns_ptr + tl.cast(column_group, tl.int64) * latent_size
                                  + latent, mask=in_latent, other=0.0)
        active = column_sum / batch >= floor
    prior_mu_columns = tl.zeros((1, BLOCK_L), ACC)  # summed over rows when Bp = 1
    prior_logvar_columns = tl.zeros((1, BLOCK_L), ACC)
    for row_block in range(group, tl.cdiv(batch, ROWS_L), num_groups):
        row = _latent_rows(row_block, ROWS_L)
        in_batch = row < batch
        valid = in_batch & in_latent
        offset = row * latent_size + latent
        mu, logvar, prior_mu, prior_logvar = _load_latents(
            mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, offset, latent, valid,
            HAS_PRIOR, PRIOR_PER_ROW, ACC)
        if HAS_PRIOR:
            kl, d_mu, d_logvar, d_prior_logvar = _gaussian_prior_kl(mu, logvar, prior_mu,
                                                                    prior_logvar)
        else:
            kl, d_mu, d_logvar = _standard_normal_kl(mu, logvar)
        kl = tl.where(valid, kl, 0.0)
        partial_offset = tile.to(tl.int64) * batch + row
        tl.store(kl_partial_ptr + partial_offset, tl.sum(kl, axis=1, keep_dims=True),
                 mask=in_batch)

        weight = beta * _weights(grad_scale_ptr, row, in_batch, uniform_weight, HAS_GRAD_SCALE,
                                 ACC)
        if FREE_BITS:
            kl_term = tl.where(valid, tl.where(active, kl, floor), 0.0)
            tl.store(kl_term_partial_ptr + partial_offset,
                     tl.sum(kl_term, axis=1, keep_dims=True), mask=in_batch)
            weight = weight * active.to(ACC)
        if NEED_MU:
            tl.store(grad_mu_ptr + offset, narrow(d_mu * weight, grad_mu_ptr.dtype.element_ty),
                     mask=valid)
        if NEED_LOGVAR:
            tl.store(grad_logvar_ptr + offset,
                     narrow(d_logvar * weight, grad_logvar_ptr.dtype.element_ty), mask=valid)
        if NEED_PRIOR_MU:
            grad_prior_mu = -d_mu * weight
            if PRIOR_PER_ROW:
                tl.store(grad_prior_mu_ptr + offset,
                         narrow(grad_prior_mu, grad_prior_mu_ptr.dtype.element_ty), mask=valid)
            else:
                prior_mu_columns += tl.sum(tl.where(valid, grad_prior_mu, 0.0), axis=0,
                                           keep_dims=True)
        if NEED_PRIOR_LOGVAR:
            grad_prior_logvar = d_prior_logvar * weight
            if PRIOR_PER_ROW:
                tl.store(grad_prior_logvar_ptr + offset,
                         narrow(grad_prior_logvar, grad_prior_logvar_ptr.dtype.element_ty),
                         mask=valid)
            else:
                prior_logvar_columns += tl.sum(tl.where(valid, grad_prior_logvar, 0.0), axis=0,
                                               keep_dims=True)
    column_offset = group.to(tl.int64) * latent_size + latent
    if NEED_PRIOR_MU and not PRIOR_PER_ROW:
        tl.store(grad_prior_mu_ptr + column_offset, prior_mu_columns, mask=in_latent)
    if NEED_PRIOR_LOGVAR and not PRIOR_PER_ROW:
        tl.store(grad_prior_logvar_ptr + column_offset, prior_logvar_columns, mask=in_latent)


@triton.autotune(configs=tuning_configs(warp_stage_configs()),
                 key=["event_size", "n_samples", "latent_size"], cache_results=True)
@triton.jit
def _elbo_kernel(x_ptr, x_hat_ptr, x_logvar_ptr, mu_ptr, logvar_ptr, prior_mu_ptr,
                 prior_logvar_ptr, beta_ptr, grad_scale_ptr, kl_columns_ptr,
                 grad_x_ptr, grad_x_hat_ptr, grad_x_logvar_ptr, grad_mu_ptr, grad_logvar_ptr,
                 grad_prior_mu_ptr, grad_prior_logvar_ptr,
                 nll_partial_ptr, kl_partial_ptr, kl_term_partial_ptr,
                 batch, event_size, n_samples, latent_size, num_event_tiles,
                 x_logvar_const: tl.float64, free_bits: tl.float64, uniform_weight: tl.float64,
                 lv_stride_s, lv_stride_b, glv_stride_group, glv_stride_tile, glv_stride_s,
                 glv_stride_b,
                 BERNOULLI: tl.constexpr, HAS_X_LOGVAR: tl.constexpr,
                 LV_PER_SAMPLE: tl.constexpr, LV_PER_ROW: tl.constexpr,
                 LV_PER_EVENT: tl.constexpr, HAS_PRIOR: tl.constexpr,
                 PRIOR_PER_ROW: tl.constexpr, FREE_BITS: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, NEED_X: tl.constexpr, NEED_X_HAT: tl.constexpr,
                 NEED_X_LOGVAR: tl.constexpr, NEED_MU: tl.constexpr, NEED_LOGVAR: tl.constexpr,
                 NEED_PRIOR_MU: tl.constexpr, NEED_PRIOR_LOGVAR: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 ROWS_L: tl.constexpr, BLOCK_L: tl.constexpr):
    group = tl.program_id(0)
    tile = tl.program_id(1)
    num_groups = tl.num_programs(0)
    if tile < num_event_tiles:
        _event_tile(x_ptr, x_hat_ptr, x_logvar_ptr, grad_scale_ptr,
                    grad_x_ptr, grad_x_hat_ptr, grad_x_logvar_ptr, nll_partial_ptr,
                    group, tile, num_groups, batch, event_size, n_samples,
                    x_logvar_const, uniform_weight,
                    lv_stride_s, lv_stride_b, glv_stride_group, glv_stride_tile, glv_stride_s,
                    glv_stride_b,
                    BERNOULLI, HAS_X_LOGVAR, HAS_GRAD_SCALE, NEED_X, NEED_X_HAT, NEED_X_LOGVAR,
                    LV_PER_SAMPLE, LV_PER_ROW, LV_PER_EVENT, ACC, BLOCK_S, BLOCK_D)
    else:
        _latent_tile(mu_ptr, logvar_ptr, prior_mu_ptr, prior_logvar_ptr, grad_scale_ptr,
                     beta_ptr, kl_columns_ptr, grad_mu_ptr, grad_logvar_ptr, grad_prior_mu_ptr,
                     grad_prior_logvar_ptr, kl_partial_ptr, kl_term_partial_ptr,
                     group, tile - num_event_tiles, num_groups, batch, latent_size, num_groups,
                     free_bits, uniform_weight,
                     HAS_PRIOR, PRIOR_PER_ROW, FREE_BITS, HAS_GRAD_SCALE, NEED_MU, NEED_LOGVAR,
                     NEED_PRIOR_MU, NEED_PRIOR_LOGVAR, ACC, ROWS_L, BLOCK_L)


@triton.jit
def _sum_partials(partial_ptr, row, valid, batch, num_tiles, ACC: tl.constexpr):
    """Σ_t partial[t, row] in tile order."""
    total = tl.zeros(row.shape, ACC)
    for tile in range(num_tiles):
        total += tl.load(partial_ptr + tl.cast(tile, tl.int64) * batch + row, mask=valid,
                         other=0.0)
    return total


@triton.jit
def _elbo_rows_kernel(loss_rows_ptr, nll_ptr, kl_ptr, kl_term_ptr, nll_partial_ptr,
                      kl_partial_ptr, kl_term_partial_ptr, beta_ptr, batch, n_samples,
                      num_event_tiles, num_latent_tiles, FREE_BITS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = row < batch
    nll = _sum_partials(nll_partial_ptr, row, valid, batch, num_event_tiles, ACC) / n_samples
    kl = _sum_partials(kl_partial_ptr, row, valid, batch, num_latent_tiles, ACC)
    if FREE_BITS:
        kl_term = _sum_partials(kl_term_partial_ptr, row, valid, batch, num_latent_tiles, ACC)
    else:
        kl_term = kl
    tl.store(nll_ptr + row, nll, mask=valid)
    tl.store(kl_ptr + row, kl, mask=valid)
    tl.store(kl_term_ptr + row, kl_term, mask=valid)
    tl.store(loss_rows_ptr + row, nll + widen(tl.load(beta_ptr), ACC) * kl_term, mask=valid)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def elbo(x, x_hat, x_logvar, x_logvar_const, mu, logvar, prior_mu, prior_logvar, beta,
         free_bits, bernoulli, reduction, grad_scale, needs_grad):
    """The fused loss; arguments, shapes and outputs as ``fastvae.reference.elbo``."""
    n_samples, batch, event_size = x_hat.shape
    latent_size = mu.shape[1]
    device = x.device
    acc = accumulation_type(x, x_hat, x_logvar, mu)
    acc_dtype = torch_accumulation_dtype(x, x_hat, x_logvar, mu)
    need = [bool(n) for n in needs_grad]
    inputs = (x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar)
    grads = [torch.empty_like(t) if n else x.new_empty(0) for t, n in zip(inputs, need)]

    block_s = triton.next_power_of_2(max(n_samples, 1))
    block_d = max(_MIN_BLOCK, min(triton.next_power_of_2(event_size), _EVENT_TILE // block_s))
    block_l = max(_MIN_BLOCK, min(triton.next_power_of_2(latent_size), _LATENT_TILE))
    rows_l = max(1, min(_LATENT_TILE // block_l, triton.next_power_of_2(batch)))
    event_tiles = _cdiv(event_size, block_d) if batch and n_samples and event_size else 0
    latent_tiles = _cdiv(latent_size, block_l) if batch and latent_size else 0
    tiles = event_tiles + latent_tiles
    groups = min(batch, max(1, resident_programs(device) // max(tiles, 1)))
    free_bits_on = free_bits > 0 and latent_tiles > 0

    def scratch(*shape):
        return torch.empty(shape, dtype=acc_dtype, device=device)

    # x_logvar's gradient goes straight to its output when it has a row per datapoint and an
    # element per event dim; otherwise per-group / per-tile partials are summed afterwards.
    lv_per_sample = lv_per_row = lv_per_event = True
    lv_strides = (0, 0)
    lv_target = None
    lv_reduced = False
    if x_logvar is not None:
        lv_samples, lv_rows, lv_events = x_logvar.shape
        lv_per_sample = lv_samples == n_samples
        lv_per_row = lv_rows == batch
        lv_per_event = lv_events == event_size
        lv_strides = (lv_rows * lv_events if lv_per_sample else 0,
                      lv_events if lv_per_row else 0)
        lv_reduced = need[2] and not (lv_per_row and lv_per_event)
        if need[2]:
            if not lv_reduced:
                lv_target = grads[2].view(1, 1, *x_logvar.shape)
            else:
                lv_target = scratch(1 if lv_per_row else groups, 1 if lv_per_event else event_tiles,
                                    *x_logvar.shape)
    glv_strides = (0, 0, 0, 0) if lv_target is None else (
        lv_target.stride(0), 0 if lv_per_event else lv_target.stride(1), lv_target.stride(2),
        lv_target.stride(3))

    has_prior = prior_mu is not None
    prior_per_row = has_prior and prior_mu.shape[0] == batch
    prior_targets = [None, None]
    for slot, index in enumerate((5, 6)):
        if need[index]:
            prior_targets[slot] = grads[index] if prior_per_row else scratch(groups, latent_size)

    nll_partial = scratch(event_tiles, batch)
    kl_partial = scratch(latent_tiles, batch)
    kl_term_partial = scratch(latent_tiles, batch) if free_bits_on else None
    kl_columns = None
    if tiles:
        if free_bits_on:
            kl_columns = scratch(groups, latent_size)
            _kl_column_kernel[(groups, latent_tiles)](
                kl_columns, mu, logvar, prior_mu, prior_logvar, batch, latent_size,
                HAS_PRIOR=has_prior, PRIOR_PER_ROW=prior_per_row, ACC=acc, ROWS_L=rows_l,
                BLOCK_L=block_l)
        _elbo_kernel[(groups, tiles)](
            x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar, beta, grad_scale, kl_columns,
            grads[0] if need[0] else None, grads[1] if need[1] else None, lv_target,
            grads[3] if need[3] else None, grads[4] if need[4] else None, *prior_targets,
            nll_partial, kl_partial, kl_term_partial,
            batch, event_size, n_samples, latent_size, event_tiles,
            float(x_logvar_const), float(free_bits),
            1.0 / batch if reduction == "mean" else 1.0,
            *lv_strides, *glv_strides,
            BERNOULLI=bool(bernoulli), HAS_X_LOGVAR=x_logvar is not None,
            LV_PER_SAMPLE=lv_per_sample, LV_PER_ROW=lv_per_row, LV_PER_EVENT=lv_per_event,
            HAS_PRIOR=has_prior, PRIOR_PER_ROW=prior_per_row, FREE_BITS=free_bits_on,
            HAS_GRAD_SCALE=grad_scale is not None, NEED_X=need[0], NEED_X_HAT=need[1],
            NEED_X_LOGVAR=need[2], NEED_MU=need[3], NEED_LOGVAR=need[4],
            NEED_PRIOR_MU=need[5], NEED_PRIOR_LOGVAR=need[6],
            ACC=acc, BLOCK_S=block_s, BLOCK_D=block_d, ROWS_L=rows_l, BLOCK_L=block_l)
    # Gradients nothing was launched for are sums over no elements.
    for index in (0, 1, 2):
        if need[index] and not event_tiles:
            grads[index] = torch.zeros_like(inputs[index])
    for index in (3, 4, 5, 6):
        if need[index] and not latent_tiles:
            grads[index] = torch.zeros_like(inputs[index])
    if lv_reduced and event_tiles:
        grads[2] = lv_target.sum((0, 1)).to(x_logvar.dtype)
    for slot, index in enumerate((5, 6)):
        if need[index] and latent_tiles and not prior_per_row:
            grads[index] = prior_targets[slot].sum(0, keepdim=True).to(inputs[index].dtype)

    rows = [torch.empty(batch, dtype=acc_dtype, device=device) for _ in range(4)]
    loss_rows, nll, kl, kl_term = rows
    if batch:
        _elbo_rows_kernel[(_cdiv(batch, _ROWS_BLOCK),)](
            loss_rows, nll, kl, kl_term, nll_partial, kl_partial, kl_term_partial, beta, batch,
            n_samples, event_tiles, latent_tiles, FREE_BITS=free_bits_on, ACC=acc,
            BLOCK=_ROWS_BLOCK)
    loss = reduce_rows(loss_rows, reduction)
    return loss, nll, kl, kl_term, tuple(grads)
