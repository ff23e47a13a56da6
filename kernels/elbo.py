"""The fused VAE loss: NLL, KL, free bits, β and every requested gradient in one launch.

Work layout (all reductions deterministic: fixed partial buffers summed in a fixed order):

* ``_elbo_kernel`` runs on a grid ``(groups, event tiles + latent tiles)``. Program
  ``(g, t)`` visits the datapoints ``g, g + groups, …`` (a persistent grid over rows). An event
  tile is all S samples × ``BLOCK_D`` event elements of one datapoint: it writes the
  per-element gradients of x, x̂ (and θ = x_log_scale) and the tile's NLL sum to
  ``nll_partial[t, b]``. A latent tile covers ``BLOCK_L`` latent dims of ``ROWS_L`` datapoints:
  it writes the KL gradients and the tile's KL sums.
* Gradients of inputs broadcast over B (θ with Bl=1, a prior with Bp=1) are summed over the
  rows of a group in registers and stored once per group; θ's broadcast over D is stored once
  per event tile. The launcher sums those partials over groups and tiles.
* Free bits need the batch-mean KL of every latent dim before the loss: ``_kl_column_kernel``
  writes per-group column sums first, which the latent tiles add up in group order.
* A KL capacity C turns a row's KL weight into ``β·w_b·sign(KL_fb[b] − C)``, known only once
  the row's KL is summed: when latent gradients are wanted, ``_kl_row_kernel`` first forms
  KL_fb per row (after the free-bits columns), and the latent tiles read their rows' signs
  from it. Without a capacity no such launch happens.
* ``_elbo_rows_kernel`` adds the per-tile partials of every row into nll, kl, kl_term (with a
  capacity ``|KL_fb − C|``) and ``nll + β·kl_term``.

The kernels take the seven inputs and the seven gradient targets as tuples in slot order
(``fastvae._common.INPUTS``); a None entry is absent (an input) or not wanted (a gradient), and
the kernels branch on that at compile time. The broadcast layout of θ is the constexpr
``THETA_FULL`` (for each of S, B, D: whether θ has that dim in full); strides follow from it.
"""
import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .._common import (Reduction, accumulation_dtype, decoder_views, in_given_shapes,
                       reduce_rows)
from ._convert import narrow, widen
from ._launch import LaunchConfig, launch, resident_programs, tunable, warp_stage_candidates
from .likelihoods import terms

# Elements per event tile (S × BLOCK_D) and per latent tile (ROWS_L × BLOCK_L), run by 4 warps:
# 8 event elements per thread (two 16-byte float32 vectors per tensor) at up to ~120
# registers, so the 4 programs per SM of the persistent grid stay resident together.
_EVENT_TILE = 1024
_LATENT_TILE = 512
_WARPS = 4
_MIN_BLOCK = 16
_ROWS_BLOCK = 128  # rows per program of the final per-row pass
_ROWS_CONFIG = LaunchConfig(dict(BLOCK=_ROWS_BLOCK), _WARPS)


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _row_weight(grad_scale_ptr, row, in_batch, uniform_weight, ACC: tl.constexpr):
    """w_b: ``grad_scale[row]``, else the uniform 1/B (MEAN) or 1."""
    if grad_scale_ptr is None:
        weight = tl.full((), uniform_weight, ACC)
    else:
        weight = widen(tl.load(grad_scale_ptr + row, mask=in_batch, other=0.0), ACC)
    return weight


@triton.jit
def _store(ptr, offset, value, mask):
    """Store ``value`` rounded to ``ptr``'s type, unless the gradient is not wanted (None)."""
    if ptr is not None:
        tl.store(ptr + offset, narrow(value, ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# event tiles: the likelihood
# ----------------------------------------------------------------------------------------------
@triton.jit
def _theta_strides(batch, event_size, THETA_FULL: tl.constexpr):
    """Strides (sample, row) of a contiguous θ ``[Sl, Bl, Dl]``, 0 along a broadcast dim."""
    events = tl.cast(event_size if THETA_FULL[2] else 1, tl.int64)
    rows = batch if THETA_FULL[1] else 1
    return rows * events if THETA_FULL[0] else 0, events if THETA_FULL[1] else 0


@triton.jit
def _theta_partial_start(group, tile, n_samples, batch, event_size, THETA_FULL: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Where the (group, tile) slice of θ's gradient target ``[G, T, Sl, Bl, Dl]`` starts:
    G = groups where θ is broadcast over B, else 1; T = event tiles where over D, else 1."""
    size = tl.cast(n_samples if THETA_FULL[0] else 1, tl.int64)
    size *= batch if THETA_FULL[1] else 1
    size *= event_size if THETA_FULL[2] else 1
    tiles = 1 if THETA_FULL[2] else tl.cdiv(event_size, BLOCK_D)
    group_stride = 0 if THETA_FULL[1] else size * tiles
    return group.to(tl.int64) * group_stride + tile * (0 if THETA_FULL[2] else size)


@triton.jit
def _event_terms(inputs, row, sample, event, valid, theta_offset, sizes, theta_const,
                 LIKELIHOOD: tl.constexpr, ACC: tl.constexpr):
    """Loads x, x̂ and θ (``inputs[:3]``) of samples ``sample`` × events ``event`` of one row;
    returns their ``terms`` (nll, ∂x, ∂x̂, ∂θ) and the offset of x̂ (and of its gradient)."""
    batch, event_size = sizes[0], sizes[2]
    x = widen(tl.load(inputs[0] + row * event_size + event, mask=event < event_size, other=0.0),
              ACC)
    hat_offset = (sample * batch + row) * event_size + event
    x_hat = widen(tl.load(inputs[1] + hat_offset, mask=valid, other=0.0), ACC)
    if inputs[2] is None:
        theta = tl.full((), theta_const, ACC)
    else:
        theta = widen(tl.load(inputs[2] + theta_offset, mask=valid, other=0.0), ACC)
    nll, d_x, d_x_hat, d_theta = terms(x, x_hat, theta, LIKELIHOOD)
    return nll, d_x, d_x_hat, d_theta, hat_offset


@triton.jit
def _event_row(inputs, grads, nll_partial_ptr, grad_scale_ptr, row, tile, sample, event, valid,
               theta_offset, sizes, theta_const, uniform_weight, LIKELIHOOD: tl.constexpr,
               THETA_FULL: tl.constexpr, ACC: tl.constexpr):
    """One row of an event tile: NLL partial, x and x̂ gradients stored; returns θ's gradient
    summed over the dims θ is broadcast along (except B, which the caller handles)."""
    batch, n_samples, event_size = sizes[0], sizes[1], sizes[2]
    in_event = event < event_size
    nll, d_x, d_x_hat, d_theta, hat_offset = _event_terms(
        inputs, row, sample, event, valid, theta_offset, sizes, theta_const, LIKELIHOOD, ACC)
    # Masked lanes still carry θ's terms: sum only the valid ones.
    tl.store(nll_partial_ptr + tile * batch + row,
             tl.sum(tl.sum(tl.where(valid, nll, 0.0), axis=1), axis=0))

    weight = _row_weight(grad_scale_ptr, row, True, uniform_weight, ACC) / n_samples
    _store(grads[1], hat_offset, d_x_hat * weight, valid)
    _store(grads[0], row * event_size + event,
           tl.sum(tl.where(valid, d_x * weight, 0.0), axis=0, keep_dims=True), in_event)
    d_theta = tl.where(valid, d_theta * weight, 0.0)
    if not THETA_FULL[0]:
        d_theta = tl.sum(d_theta, axis=0, keep_dims=True)
    if not THETA_FULL[2]:
        d_theta = tl.sum(d_theta, axis=1, keep_dims=True)
    return d_theta


@triton.jit
def _event_tile(inputs, grads, nll_partial_ptr, grad_scale_ptr, group, tile, sizes,
                theta_const, uniform_weight, LIKELIHOOD: tl.constexpr, THETA_FULL: tl.constexpr,
                ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    batch, n_samples, event_size = sizes[0], sizes[1], sizes[2]
    tile = tile.to(tl.int64)
    sample = tl.arange(0, BLOCK_S)[:, None].to(tl.int64)
    event = tile * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    valid = (sample < n_samples) & (event < event_size)
    stride_sample, stride_row = _theta_strides(batch, event_size, THETA_FULL)
    theta_offset = sample * stride_sample
    if THETA_FULL[2]:
        theta_offset += event

    # θ's gradient target: one sample / event column where θ is broadcast along S / D.
    THETA_S: tl.constexpr = BLOCK_S if THETA_FULL[0] else 1
    theta_sample = tl.arange(0, THETA_S)[:, None].to(tl.int64)
    grad_theta_offset = theta_sample * stride_sample + _theta_partial_start(
        group, tile, n_samples, batch, event_size, THETA_FULL, BLOCK_D)
    grad_theta_valid = theta_sample < n_samples
    if THETA_FULL[2]:
        grad_theta_offset += event
        grad_theta_valid = grad_theta_valid & (event < event_size)
    theta_columns = tl.zeros(grad_theta_offset.shape, ACC)  # summed over rows when Bl = 1

    for row_index in range(group, batch, tl.num_programs(0)):
        row = tl.cast(row_index, tl.int64)
        d_theta = _event_row(inputs, grads, nll_partial_ptr, grad_scale_ptr, row, tile, sample,
                             event, valid, theta_offset + row * stride_row, sizes, theta_const,
                             uniform_weight, LIKELIHOOD, THETA_FULL, ACC)
        if THETA_FULL[1]:
            _store(grads[2], grad_theta_offset + row * stride_row, d_theta, grad_theta_valid)
        else:
            theta_columns += d_theta
    if not THETA_FULL[1]:
        _store(grads[2], grad_theta_offset, theta_columns, grad_theta_valid)


# ----------------------------------------------------------------------------------------------
# latent tiles: the KL
# ----------------------------------------------------------------------------------------------
@triton.jit
def _kl_terms(mu, logvar, prior_mu, prior_logvar, HAS_PRIOR: tl.constexpr):
    """Per-element KL and its gradients (∂μ, ∂lv, ∂lv_p; ∂μ_p = −∂μ) against N(0, I) or a
    diagonal Gaussian prior."""
    var = tl.exp(logvar)
    if HAS_PRIOR:
        diff = mu - prior_mu
        inv_prior_var = tl.exp(-prior_logvar)
        spread = (var + diff * diff) * inv_prior_var
        kl = 0.5 * (prior_logvar - logvar + spread - 1.0)
        result = kl, diff * inv_prior_var, 0.5 * (var * inv_prior_var - 1.0), 0.5 * (1.0 - spread)
    else:
        kl = 0.5 * (mu * mu + var - 1.0 - logvar)
        result = kl, mu, 0.5 * (var - 1.0), tl.zeros_like(kl)
    return result


@triton.jit
def _latent_kl(inputs, row, latent, latent_size, valid, PRIOR_PER_ROW: tl.constexpr,
               ACC: tl.constexpr):
    """Loads the latents of ``[rows, latent]`` and returns ``_kl_terms`` of them."""
    offset = row * latent_size + latent
    mu = widen(tl.load(inputs[3] + offset, mask=valid, other=0.0), ACC)
    logvar = widen(tl.load(inputs[4] + offset, mask=valid, other=0.0), ACC)
    if inputs[5] is None:
        prior_mu, prior_logvar = mu, logvar  # unused against N(0, I)
    else:
        prior_offset = offset if PRIOR_PER_ROW else latent
        prior_mu = widen(tl.load(inputs[5] + prior_offset, mask=valid, other=0.0), ACC)
        prior_logvar = widen(tl.load(inputs[6] + prior_offset, mask=valid, other=0.0), ACC)
    return _kl_terms(mu, logvar, prior_mu, prior_logvar, inputs[5] is not None)


@triton.jit
def _kl_column_kernel(inputs, kl_columns_ptr, sizes, PRIOR_PER_ROW: tl.constexpr,
                      ACC: tl.constexpr, ROWS_L: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per-group column sums of the KL over datapoints (for free bits): ``[groups, d]``."""
    batch, latent_size = sizes[0], sizes[3]
    group = tl.program_id(0)
    latent = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    in_latent = latent < latent_size
    column_sum = tl.zeros((1, BLOCK_L), ACC)
    for row_block in range(group, tl.cdiv(batch, ROWS_L), tl.num_programs(0)):
        row = tl.cast(row_block, tl.int64) * ROWS_L + tl.arange(0, ROWS_L)[:, None]
        valid = (row < batch) & in_latent
        kl = _latent_kl(inputs, row, latent, latent_size, valid, PRIOR_PER_ROW, ACC)[0]
        column_sum += tl.sum(tl.where(valid, kl, 0.0), axis=0, keep_dims=True)
    tl.store(kl_columns_ptr + group.to(tl.int64) * latent_size + latent, column_sum,
             mask=in_latent)


@triton.jit
def _active_dims(kl_columns_ptr, latent, in_latent, batch, latent_size, floor, groups,
                 ACC: tl.constexpr, BLOCK_L: tl.constexpr):
    """Free bits: the latent dims whose batch-mean KL reaches the floor (all without), from
    the column sums of ``groups`` row groups."""
    column_sum = tl.zeros((1, BLOCK_L), ACC)
    if kl_columns_ptr is not None:
        for column_group in range(groups):  # in group order on every program
            column_sum += tl.load(kl_columns_ptr + tl.cast(column_group, tl.int64) * latent_size
                                  + latent, mask=in_latent, other=0.0)
    return column_sum / batch >= floor


@triton.jit
def _kl_term_sums(kl, valid, active, floor):
    """Per row of a latent tile, the KL term after free bits (a clamped dim counts the floor)."""
    return tl.sum(tl.where(valid, tl.where(active, kl, floor), 0.0), axis=1, keep_dims=True)


@triton.jit
def _kl_row_kernel(inputs, kl_columns_ptr, kl_fb_ptr, sizes, free_bits: tl.float64, groups,
                   PRIOR_PER_ROW: tl.constexpr, ACC: tl.constexpr, ROWS_L: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """The capacity pre-pass: KL_fb ``[B]``, the KL after free bits of ``ROWS_L`` rows per
    program, summed over latent tiles in tile order as ``_elbo_rows_kernel`` sums them."""
    batch, latent_size = sizes[0], sizes[3]
    row = tl.program_id(0).to(tl.int64) * ROWS_L + tl.arange(0, ROWS_L)[:, None]
    in_batch = row < batch
    floor = tl.full((), free_bits, ACC)
    total = tl.zeros((ROWS_L, 1), ACC)
    for tile in range(tl.cdiv(latent_size, BLOCK_L)):
        latent = tl.cast(tile, tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
        in_latent = latent < latent_size
        active = _active_dims(kl_columns_ptr, latent, in_latent, batch, latent_size, floor,
                              groups, ACC, BLOCK_L)
        valid = in_batch & in_latent
        kl = _latent_kl(inputs, row, latent, latent_size, valid, PRIOR_PER_ROW, ACC)[0]
        total += _kl_term_sums(kl, valid, active, floor)
    tl.store(kl_fb_ptr + row, total, mask=in_batch)


@triton.jit
def _capacity_sign(weights, row, in_batch, ACC: tl.constexpr):
    """sign(KL_fb[b] − C) per row from ``weights`` = (grad_scale, C, KL_fb); 1 without KL_fb."""
    if weights[2] is None:
        sign = tl.full((), 1.0, ACC)
    else:
        excess = (tl.load(weights[2] + row, mask=in_batch, other=0.0)
                  - widen(tl.load(weights[1]), ACC))
        sign = (excess > 0).to(ACC) - (excess < 0).to(ACC)
    return sign


@triton.jit
def _latent_rows(inputs, grads, partials, weights, row_block, tile, latent, in_latent,
                 active, beta, floor, sizes, uniform_weight, PRIOR_PER_ROW: tl.constexpr,
                 ACC: tl.constexpr, ROWS_L: tl.constexpr):
    """``ROWS_L`` rows of a latent tile: KL partials and KL gradients stored; returns the
    prior gradients summed over these rows (for a prior shared by every row)."""
    batch, latent_size = sizes[0], sizes[3]
    row = tl.cast(row_block, tl.int64) * ROWS_L + tl.arange(0, ROWS_L)[:, None]
    in_batch = row < batch
    valid = in_batch & in_latent
    kl, d_mu, d_logvar, d_prior_logvar = _latent_kl(inputs, row, latent, latent_size, valid,
                                                    PRIOR_PER_ROW, ACC)
    kl = tl.where(valid, kl, 0.0)
    partial_offset = tile * batch + row
    tl.store(partials[1] + partial_offset, tl.sum(kl, axis=1, keep_dims=True), mask=in_batch)
    weight = beta * _row_weight(weights[0], row, in_batch, uniform_weight, ACC)
    weight = weight * _capacity_sign(weights, row, in_batch, ACC)
    if partials[2] is not None:  # free bits: a clamped dim counts the floor and has no gradient
        tl.store(partials[2] + partial_offset, _kl_term_sums(kl, valid, active, floor),
                 mask=in_batch)
        weight = weight * active.to(ACC)
    offset = row * latent_size + latent
    _store(grads[3], offset, d_mu * weight, valid)
    _store(grads[4], offset, d_logvar * weight, valid)
    grad_prior_mu = tl.where(valid, -d_mu * weight, 0.0)
    grad_prior_logvar = tl.where(valid, d_prior_logvar * weight, 0.0)
    if PRIOR_PER_ROW:
        _store(grads[5], offset, grad_prior_mu, valid)
        _store(grads[6], offset, grad_prior_logvar, valid)
    return (tl.sum(grad_prior_mu, axis=0, keep_dims=True),
            tl.sum(grad_prior_logvar, axis=0, keep_dims=True))


@triton.jit
def _latent_tile(inputs, grads, partials, beta_ptr, weights, group, tile, sizes,
                 free_bits, uniform_weight, PRIOR_PER_ROW: tl.constexpr, ACC: tl.constexpr,
                 ROWS_L: tl.constexpr, BLOCK_L: tl.constexpr):
    batch, latent_size = sizes[0], sizes[3]
    tile = tile.to(tl.int64)
    latent = tile * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    in_latent = latent < latent_size
    beta = widen(tl.load(beta_ptr), ACC)
    floor = tl.full((), free_bits, ACC)
    active = _active_dims(partials[3], latent, in_latent, batch, latent_size, floor,
                          tl.num_programs(0), ACC, BLOCK_L)
    prior_mu_columns = tl.zeros((1, BLOCK_L), ACC)  # summed over rows when Bp = 1
    prior_logvar_columns = tl.zeros((1, BLOCK_L), ACC)
    for row_block in range(group, tl.cdiv(batch, ROWS_L), tl.num_programs(0)):
        grad_prior_mu, grad_prior_logvar = _latent_rows(
            inputs, grads, partials, weights, row_block, tile, latent, in_latent, active,
            beta, floor, sizes, uniform_weight, PRIOR_PER_ROW, ACC, ROWS_L)
        if not PRIOR_PER_ROW:
            prior_mu_columns += grad_prior_mu
            prior_logvar_columns += grad_prior_logvar
    if not PRIOR_PER_ROW:
        column_offset = group.to(tl.int64) * latent_size + latent
        _store(grads[5], column_offset, prior_mu_columns, in_latent)
        _store(grads[6], column_offset, prior_logvar_columns, in_latent)


# ----------------------------------------------------------------------------------------------
# the kernels
# ----------------------------------------------------------------------------------------------
@tunable(key=["sizes"], candidates=warp_stage_candidates())
@triton.jit
def _elbo_kernel(inputs, grads, partials, beta_ptr, weights, sizes,
                 theta_const: tl.float64, free_bits: tl.float64, uniform_weight: tl.float64,
                 LIKELIHOOD: tl.constexpr, THETA_FULL: tl.constexpr, PRIOR_PER_ROW: tl.constexpr,
                 ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 ROWS_L: tl.constexpr, BLOCK_L: tl.constexpr):
    """``inputs``, ``grads``: 7-tuples in slot order (see the module docstring); ``partials``:
    (nll_partial, kl_partial, kl_term_partial, kl_columns), the last two None without free
    bits; ``weights``: (grad_scale, capacity, kl_fb), None where absent (KL_fb, from
    ``_kl_row_kernel``, only with a capacity and latent gradients); ``sizes``: (B, S, D, d)."""
    group = tl.program_id(0)
    tile = tl.program_id(1)
    event_tiles = tl.cdiv(sizes[2], BLOCK_D)
    if tile < event_tiles:
        _event_tile(inputs, grads, partials[0], weights[0], group, tile, sizes, theta_const,
                    uniform_weight, LIKELIHOOD, THETA_FULL, ACC, BLOCK_S, BLOCK_D)
    else:
        _latent_tile(inputs, grads, partials, beta_ptr, weights, group,
                     tile - event_tiles, sizes, free_bits, uniform_weight, PRIOR_PER_ROW, ACC,
                     ROWS_L, BLOCK_L)


@triton.jit
def _sum_partials(partial_ptr, row, valid, batch, num_tiles, ACC: tl.constexpr):
    """Σ_t partial[t, row] in tile order."""
    total = tl.zeros(row.shape, ACC)
    for tile in range(num_tiles):
        total += tl.load(partial_ptr + tl.cast(tile, tl.int64) * batch + row, mask=valid,
                         other=0.0)
    return total


@triton.jit
def _elbo_rows_kernel(rows, partials, beta_ptr, capacity_ptr, batch, n_samples, event_tiles,
                      latent_tiles, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """``rows`` = (loss, nll, kl, kl_term), each ``[B]``; ``partials`` as ``_elbo_kernel``'s;
    ``capacity_ptr`` C or None."""
    row = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = row < batch
    nll = _sum_partials(partials[0], row, valid, batch, event_tiles, ACC) / n_samples
    kl = _sum_partials(partials[1], row, valid, batch, latent_tiles, ACC)
    if partials[2] is None:
        kl_term = kl
    else:
        kl_term = _sum_partials(partials[2], row, valid, batch, latent_tiles, ACC)
    if capacity_ptr is not None:
        kl_term = tl.abs(kl_term - widen(tl.load(capacity_ptr), ACC))
    tl.store(rows[1] + row, nll, mask=valid)
    tl.store(rows[2] + row, kl, mask=valid)
    tl.store(rows[3] + row, kl_term, mask=valid)
    tl.store(rows[0] + row, nll + widen(tl.load(beta_ptr), ACC) * kl_term, mask=valid)


# ----------------------------------------------------------------------------------------------
# the launcher
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the shapes decide about one loss launch; built once per shape class (cached)."""
    acc: torch.dtype
    groups: int              # row groups of the persistent grid
    event_tiles: int         # 0: no event tile runs (B = 0 or D = 0)
    latent_tiles: int        # 0: no latent tile runs (B = 0 or d = 0)
    theta_full: tuple        # (S, B, D): whether θ has that dim in full
    theta_partial: tuple     # shape θ's gradient is summed in, () when it goes to the output
    prior_per_row: bool
    free_bits: bool
    main: LaunchConfig       # _elbo_kernel: blocks, warps, stages
    latent: LaunchConfig     # _kl_column_kernel

    @property
    def acc_type(self):
        return tl.float64 if self.acc == torch.float64 else tl.float32

    def runs(self, slot: int) -> bool:
        """Whether a kernel writes gradient slot ``slot`` (else it is a sum over nothing)."""
        return (self.event_tiles if slot < 3 else self.latent_tiles) > 0

    def partial_dims(self, slot: int) -> tuple:
        """The dims of slot's target that are summed into its gradient after the kernel; ()
        where the kernel writes the gradient itself."""
        if slot == 2 and self.theta_partial:
            return (0, 1)
        return (0,) if slot >= 5 and not self.prior_per_row else ()


def _event_blocks(n_samples: int, event_size: int):
    block_s = triton.next_power_of_2(max(n_samples, 1))
    block_d = max(_MIN_BLOCK, min(triton.next_power_of_2(max(event_size, 1)),
                                  _EVENT_TILE // block_s))
    return block_s, block_d


def _latent_blocks(batch: int, latent_size: int):
    block_l = max(_MIN_BLOCK, min(triton.next_power_of_2(max(latent_size, 1)), _LATENT_TILE))
    rows_l = max(1, min(_LATENT_TILE // block_l, triton.next_power_of_2(max(batch, 1))))
    return rows_l, block_l


def _theta_layout(theta_shape, sizes, groups: int, event_tiles: int):
    """θ's ``THETA_FULL`` (for each of S, B, D: whether θ ``[Sl, Bl, Dl]`` has that dim in
    full; all for the constant) and the shape ``[G, T, Sl, Bl, Dl]`` of the partials its
    gradient is summed in (G = groups where θ is broadcast over B, T = event tiles where over
    D, else 1), () when the kernel writes the gradient itself."""
    full = (True, True, True) if theta_shape is None else tuple(
        n == size for n, size in zip(theta_shape, sizes))
    partial = () if full[1] and full[2] else (1 if full[1] else groups,
                                              1 if full[2] else event_tiles, *theta_shape)
    return full, partial


@functools.lru_cache(maxsize=512)
def _plan(n_samples, batch, event_size, latent_size, theta_shape, prior_rows, free_bits, acc,
          programs) -> _Plan:
    block_s, block_d = _event_blocks(n_samples, event_size)
    rows_l, block_l = _latent_blocks(batch, latent_size)
    event_tiles = -(-event_size // block_d) if batch else 0
    latent_tiles = -(-latent_size // block_l) if batch else 0
    groups = min(batch, max(1, programs // max(event_tiles + latent_tiles, 1)))
    full, partial = _theta_layout(theta_shape, (n_samples, batch, event_size), groups,
                                  event_tiles)
    latent_meta = dict(ROWS_L=rows_l, BLOCK_L=block_l)
    main = LaunchConfig(dict(BLOCK_S=block_s, BLOCK_D=block_d, **latent_meta), _WARPS)
    return _Plan(acc, groups, event_tiles, latent_tiles, full, partial, prior_rows == batch,
                 free_bits and latent_tiles > 0, main, LaunchConfig(latent_meta, _WARPS))


def _target(tensor, slot, plan):
    """Where the kernel writes slot's gradient: the output, or a partial buffer to sum."""
    if plan.partial_dims(slot) == (0, 1):
        return tensor.new_empty(plan.theta_partial, dtype=plan.acc)
    if plan.partial_dims(slot):
        return tensor.new_empty((plan.groups, tensor.shape[1]), dtype=plan.acc)
    return torch.empty_like(tensor)


def _gradient_targets(inputs, needs_grad, plan):
    """Per slot the kernel's target, None where no kernel writes that gradient."""
    return tuple(_target(tensor, slot, plan) if need and plan.runs(slot) else None
                 for slot, (tensor, need) in enumerate(zip(inputs, needs_grad)))


def _gradient(tensor, target, need, slot, plan, x):
    """Slot's gradient output from what the kernel wrote."""
    if not need:
        return x.new_empty(0)
    if target is None:  # a sum over no elements
        return torch.zeros_like(tensor)
    dims = plan.partial_dims(slot)
    return target.sum(dims).view(tensor.shape).to(tensor.dtype) if dims else target


def _partials(plan, batch, latent_size, device):
    """(nll_partial, kl_partial, kl_term_partial, kl_columns); the last two for free bits."""
    def scratch(*shape):
        return torch.empty(shape, dtype=plan.acc, device=device)

    free_bits = plan.free_bits
    return (scratch(plan.event_tiles, batch), scratch(plan.latent_tiles, batch),
            scratch(plan.latent_tiles, batch) if free_bits else None,
            scratch(plan.groups, latent_size) if free_bits else None)


def _capacity_rows(plan, capacity, needs_grad, batch, device):
    """KL_fb's buffer for the capacity pre-pass: only with a capacity and a latent gradient to
    sign (a latent tile runs only when there are rows and latent dims)."""
    if capacity is None or not plan.latent_tiles or not any(needs_grad[3:]):
        return None
    return torch.empty(batch, dtype=plan.acc, device=device)


def _launch_tiles(plan, inputs, targets, partials, beta, weights, sizes, likelihood,
                  theta_const, free_bits, uniform_weight):
    grid = (plan.groups, plan.event_tiles + plan.latent_tiles)
    if plan.free_bits:
        launch(_kl_column_kernel, (plan.groups, plan.latent_tiles), plan.latent, inputs,
               partials[3], sizes, PRIOR_PER_ROW=plan.prior_per_row, ACC=plan.acc_type)
    if weights[2] is not None:
        row_blocks = -(-sizes[0] // plan.latent.meta["ROWS_L"])
        launch(_kl_row_kernel, (row_blocks,), plan.latent, inputs, partials[3], weights[2],
               sizes, float(free_bits), plan.groups, PRIOR_PER_ROW=plan.prior_per_row,
               ACC=plan.acc_type)
    launch(_elbo_kernel, grid, plan.main, inputs, targets, partials, beta, weights, sizes,
           float(theta_const), float(free_bits), uniform_weight, LIKELIHOOD=int(likelihood),
           THETA_FULL=plan.theta_full, PRIOR_PER_ROW=plan.prior_per_row, ACC=plan.acc_type)


def _rows(plan, partials, beta, capacity, batch, n_samples, device):
    """(loss, nll, kl, kl_term) per datapoint, from the per-tile partials."""
    rows = tuple(torch.empty(batch, dtype=plan.acc, device=device) for _ in range(4))
    if batch:
        launch(_elbo_rows_kernel, (-(-batch // _ROWS_BLOCK),), _ROWS_CONFIG, rows, partials,
               beta, capacity, batch, n_samples, plan.event_tiles, plan.latent_tiles,
               ACC=plan.acc_type)
    return rows


def elbo(x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar, beta, capacity, grad_scale,
         likelihood, x_log_scale_const, free_bits, reduction, needs_grad):
    """The fused loss; arguments, shapes and outputs as the reference backend's ``elbo``."""
    given = (x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar)
    x_hat, x_log_scale = decoder_views(x_hat, x_log_scale)
    inputs = (x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar)
    n_samples, batch, event_size = x_hat.shape
    sizes = (batch, n_samples, event_size, mu.shape[1])
    plan = _plan(n_samples, batch, event_size, mu.shape[1],
                 None if x_log_scale is None else tuple(x_log_scale.shape),
                 None if prior_mu is None else prior_mu.shape[0], free_bits > 0,
                 accumulation_dtype(x, x_hat, x_log_scale, mu), resident_programs(x.device))
    needs_grad = [bool(need) for need in needs_grad]
    targets = _gradient_targets(inputs, needs_grad, plan)
    partials = _partials(plan, batch, mu.shape[1], x.device)
    weights = (grad_scale, capacity, _capacity_rows(plan, capacity, needs_grad, batch, x.device))
    if plan.groups and (plan.event_tiles or plan.latent_tiles):
        uniform_weight = 1.0 / batch if reduction == Reduction.MEAN else 1.0
        _launch_tiles(plan, inputs, targets, partials, beta, weights, sizes, likelihood,
                      x_log_scale_const, free_bits, uniform_weight)
    loss_rows, nll, kl, kl_term = _rows(plan, partials, beta, capacity, batch, n_samples,
                                        x.device)
    grads = [_gradient(tensor, target, need, slot, plan, x)
             for slot, (tensor, target, need) in enumerate(zip(inputs, targets, needs_grad))]
    return (reduce_rows(loss_rows, reduction), nll, kl, kl_term,
            *in_given_shapes(grads, given, needs_grad))
