"""The mixture prior's log-ratio op pair (contract: ``fastvae.backends.reference``).

Rows are the samples ``(s, b)`` of ``z`` viewed as ``[S·B, d]``. A program takes ``BLOCK_R``
rows and streams over the components ``BLOCK_K`` at a time: the terms ``logits_k + c_k`` of a
``[BLOCK_R, BLOCK_K]`` tile are summed over the latent dims one dim at a time, reading the
component tables transposed (``[d, K]``, so a dim's components are contiguous), and folded
into an online log-sum-exp (running maximum and rescaled sum per row). No ``[S, B, K]`` value
is stored.

* ``_forward_kernel``: one program per row block; log q and the log ratio.
* ``_backward_kernel``: a persistent grid over row blocks. It re-forms each tile's
  responsibilities ``r = exp(logits_k + c_k − log_prior_sum)`` and in a second sweep over the
  dims adds ``Σ_k r·(z − m_k)e^−v_k`` into a ``[S·B, d]`` scratch (for z's gradient) and the
  component gradients, weighted by ``−g·r``, into the program's own row of partial sums
  ``[programs, (2d + 1)·K + 1]`` (∂means and ∂logvars transposed, ∂logits without its softmax
  term, Σ g). The launcher adds the rows up in a fixed order: deterministic, no atomics.
* ``_latent_grads_kernel``: per ``[datapoints, dims]`` tile, z's gradient from the scratch and
  q's terms, and mu's and logvar's gradients summed over the samples in order.

The first component block of a row always holds component 0 (K ≥ 1), so the running maximum
is finite after it, and masked components (terms −inf) add exactly nothing.
"""
import functools

import torch
import triton
import triton.language as tl

from .._common import accumulation_dtype
from ._convert import narrow, widen
from ._launch import LaunchConfig, block_for, launch, resident_programs

# Elements of a [rows, components] tile, and of a [datapoints, dims] tile.
_TILE = 2048
_LATENT_TILE = 1024
_MAX_BLOCK_K = 128
_MAX_BLOCK_D = 128
# Partial-sum values at most (16 MiB of float32): bounds the backward's programs for large K·d.
_PARTIAL_ELEMENTS = 1 << 22
_WARPS = 4


# ----------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _component_terms(z_ptr, means_t_ptr, inv_var_t_ptr, offsets_ptr, row, in_rows, component,
                     in_components, latent_size, n_components, ACC: tl.constexpr):
    """``[rows, components]``: logits_k + c_k, −inf for masked components."""
    square_sum = tl.zeros((row.shape[0], component.shape[1]), ACC)
    for j in range(latent_size):
        z = widen(tl.load(z_ptr + row * latent_size + j, mask=in_rows, other=0.0), ACC)
        table = tl.cast(j, tl.int64) * n_components + component
        residual = z - tl.load(means_t_ptr + table, mask=in_components, other=0.0)
        square_sum += residual * residual * tl.load(inv_var_t_ptr + table, mask=in_components,
                                                    other=0.0)
    offset = tl.load(offsets_ptr + component, mask=in_components, other=-float("inf"))
    return offset - 0.5 * square_sum


@triton.jit
def _log_q(z_ptr, mu_ptr, logvar_ptr, row, in_rows, batch, latent_size, ACC: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """``[rows, 1]``: log q(z|x) = −½Σ_d((z − μ)²e^−λ + λ) of each row's sample."""
    datapoint = row % batch
    total = tl.zeros(row.shape, ACC)
    for d0 in range(0, latent_size, BLOCK_D):
        dim = d0 + tl.arange(0, BLOCK_D)[None, :]
        valid = in_rows & (dim < latent_size)
        z = widen(tl.load(z_ptr + row * latent_size + dim, mask=valid, other=0.0), ACC)
        mu = widen(tl.load(mu_ptr + datapoint * latent_size + dim, mask=valid, other=0.0), ACC)
        logvar = widen(tl.load(logvar_ptr + datapoint * latent_size + dim, mask=valid, other=0.0),
                       ACC)
        residual = z - mu
        total += tl.sum(residual * residual * tl.exp(-logvar) + logvar, axis=1, keep_dims=True)
    return -0.5 * total


@triton.jit
def _rows(block, BLOCK_R: tl.constexpr, rows):
    row = tl.cast(block, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    return row, row < rows


# ----------------------------------------------------------------------------------------------
# the kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(z_ptr, mu_ptr, logvar_ptr, tables, log_norm_ptr, log_ratio_ptr,
                    log_prior_sum_ptr, sizes, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """``tables``: (means_t, inv_var_t, offsets); ``sizes``: (S·B, B, d, K)."""
    rows, batch, latent_size, n_components = sizes[0], sizes[1], sizes[2], sizes[3]
    row, in_rows = _rows(tl.program_id(0), BLOCK_R, rows)
    maximum = tl.full((BLOCK_R, 1), -float("inf"), ACC)
    total = tl.zeros((BLOCK_R, 1), ACC)
    for k0 in range(0, n_components, BLOCK_K):
        component = k0 + tl.arange(0, BLOCK_K)[None, :]
        terms = _component_terms(z_ptr, tables[0], tables[1], tables[2], row, in_rows, component,
                                 component < n_components, latent_size, n_components, ACC)
        larger = tl.maximum(maximum, tl.max(terms, axis=1, keep_dims=True))
        total = total * tl.exp(maximum - larger) + tl.sum(tl.exp(terms - larger), axis=1,
                                                           keep_dims=True)
        maximum = larger
    log_prior_sum = maximum + tl.log(total)
    log_q = _log_q(z_ptr, mu_ptr, logvar_ptr, row, in_rows, batch, latent_size, ACC, BLOCK_D)
    tl.store(log_prior_sum_ptr + row, log_prior_sum, mask=in_rows)
    tl.store(log_ratio_ptr + row, log_q - (log_prior_sum - tl.load(log_norm_ptr)), mask=in_rows)


@triton.jit
def _add(ptr, offset, value, mask):
    """``ptr[offset] += value`` where the target exists (None: not wanted)."""
    if ptr is not None:
        tl.store(ptr + offset, tl.load(ptr + offset, mask=mask) + value, mask=mask)


@triton.jit
def _backward_tile(z_ptr, tables, z_sum_ptr, partial_ptr, row, in_rows, g, log_prior_sum, k0,
                   latent_size, n_components, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """One ``[rows, components]`` tile: z's share into the scratch, the components' gradients
    into the partial row."""
    component = k0 + tl.arange(0, BLOCK_K)[None, :]
    in_components = component < n_components
    terms = _component_terms(z_ptr, tables[0], tables[1], tables[2], row, in_rows, component,
                             in_components, latent_size, n_components, ACC)
    responsibility = tl.where(in_rows, tl.exp(terms - log_prior_sum), 0.0)
    coef = -g * responsibility
    table_size = tl.cast(latent_size, tl.int64) * n_components
    flat = tl.reshape(component, (BLOCK_K,))
    in_flat = flat < n_components
    for j in range(latent_size):
        z = widen(tl.load(z_ptr + row * latent_size + j, mask=in_rows, other=0.0), ACC)
        table = tl.cast(j, tl.int64) * n_components + component
        residual = z - tl.load(tables[0] + table, mask=in_components, other=0.0)
        scaled = residual * tl.load(tables[1] + table, mask=in_components, other=0.0)
        _add(z_sum_ptr, row * latent_size + j,
             tl.sum(responsibility * scaled, axis=1, keep_dims=True), in_rows)
        flat_table = tl.cast(j, tl.int64) * n_components + flat
        _add(partial_ptr, flat_table, tl.sum(coef * scaled, axis=0), in_flat)
        _add(partial_ptr, table_size + flat_table,
             tl.sum(coef * 0.5 * (residual * scaled - 1.0), axis=0), in_flat)
    _add(partial_ptr, 2 * table_size + flat, tl.sum(coef, axis=0), in_flat)


@triton.jit
def _backward_kernel(z_ptr, grad_ptr, log_prior_sum_ptr, tables, z_sum_ptr, partials_ptr, sizes,
                     ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``z_sum_ptr``: ``[S·B, d]`` zeros, or None when z's gradient is not wanted;
    ``partials_ptr``: ``[programs, (2d + 1)·K + 1]`` zeros, or None when no component gradient
    is wanted."""
    rows, latent_size, n_components = sizes[0], sizes[2], sizes[3]
    program = tl.program_id(0)
    partial_ptr = partials_ptr
    if partials_ptr is not None:
        partial_ptr = partials_ptr + program.to(tl.int64) * ((2 * latent_size + 1) * n_components
                                                            + 1)
    g_total = tl.zeros((1, 1), ACC)
    for block in range(program, tl.cdiv(rows, BLOCK_R), tl.num_programs(0)):
        row, in_rows = _rows(block, BLOCK_R, rows)
        g = tl.load(grad_ptr + row, mask=in_rows, other=0.0).to(ACC)
        log_prior_sum = tl.load(log_prior_sum_ptr + row, mask=in_rows, other=0.0).to(ACC)
        for k0 in range(0, n_components, BLOCK_K):
            _backward_tile(z_ptr, tables, z_sum_ptr, partial_ptr, row, in_rows, g, log_prior_sum,
                           k0, latent_size, n_components, ACC, BLOCK_K)
        g_total += tl.sum(g, axis=0, keep_dims=True)
    if partial_ptr is not None:
        tl.store(partial_ptr + (2 * latent_size + 1) * n_components + tl.zeros((1, 1), tl.int32),
                 g_total)


@triton.jit
def _latent_grads_kernel(inputs, grads, z_sum_ptr, grad_ptr, sizes, ACC: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``inputs``: (z, mu, logvar); ``grads``: their gradient targets, None where not wanted;
    ``sizes``: (S, B, d)."""
    n_samples, batch, latent_size = sizes[0], sizes[1], sizes[2]
    datapoint = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    dim = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    valid = (datapoint < batch) & (dim < latent_size)
    offset = datapoint * latent_size + dim
    mu = widen(tl.load(inputs[1] + offset, mask=valid, other=0.0), ACC)
    logvar = widen(tl.load(inputs[2] + offset, mask=valid, other=0.0), ACC)
    inv_var = tl.exp(-logvar)
    mu_sum = tl.zeros((BLOCK_B, BLOCK_D), ACC)
    logvar_sum = tl.zeros((BLOCK_B, BLOCK_D), ACC)
    for s in range(n_samples):
        row = tl.cast(s, tl.int64) * batch + datapoint
        g = tl.load(grad_ptr + row, mask=datapoint < batch, other=0.0).to(ACC)
        residual = widen(tl.load(inputs[0] + row * latent_size + dim, mask=valid, other=0.0),
                         ACC) - mu
        scaled = residual * inv_var
        if grads[0] is not None:
            z_sum = tl.load(z_sum_ptr + row * latent_size + dim, mask=valid, other=0.0)
            tl.store(grads[0] + row * latent_size + dim,
                     narrow(g * (z_sum - scaled), grads[0].dtype.element_ty), mask=valid)
        mu_sum += g * scaled
        logvar_sum += g * 0.5 * (residual * scaled - 1.0)
    if grads[1] is not None:
        tl.store(grads[1] + offset, narrow(mu_sum, grads[1].dtype.element_ty), mask=valid)
    if grads[2] is not None:
        tl.store(grads[2] + offset, narrow(logvar_sum, grads[2].dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# the launchers
# ----------------------------------------------------------------------------------------------
def _dims_block(latent_size: int) -> int:
    """Latent dims per chunk of a [rows, dims] tile."""
    return max(16, min(triton.next_power_of_2(max(latent_size, 1)), _MAX_BLOCK_D))


@functools.lru_cache(maxsize=256)
def _row_config(rows: int, n_components: int) -> LaunchConfig:
    """BLOCK_K components and BLOCK_R rows per tile: at most _TILE elements, fewer rows where
    that spreads a small batch over more programs."""
    block_k = max(16, min(triton.next_power_of_2(n_components), _MAX_BLOCK_K))
    block_r = min(block_for(rows, 1, _TILE // block_k), triton.next_power_of_2(max(rows, 1)))
    return LaunchConfig(dict(BLOCK_R=block_r, BLOCK_K=block_k), _WARPS)


@functools.lru_cache(maxsize=256)
def _latent_config(batch: int, latent_size: int) -> LaunchConfig:
    block_d = _dims_block(latent_size)
    block_b = max(1, min(triton.next_power_of_2(max(batch, 1)), _LATENT_TILE // block_d))
    return LaunchConfig(dict(BLOCK_B=block_b, BLOCK_D=block_d), _WARPS)


def _tables(means, logvars, logits, acc):
    """(means_t, inv_var_t, offsets) in ``acc``: the tables the kernels stream over — the
    means and e^−logvars transposed to [d, K], and logits_k − ½Σ_d logvars_k; with
    logsumexp(logits) and softmax(logits)."""
    means, logvars, logits = means.to(acc), logvars.to(acc), logits.to(acc)
    tables = (means.t().contiguous(), torch.exp(-logvars).t().contiguous(),
              logits - 0.5 * logvars.sum(1))
    return tables, torch.logsumexp(logits, 0), torch.softmax(logits, 0)


def _acc_type(acc):
    return tl.float64 if acc == torch.float64 else tl.float32


def mixture_log_ratio(z, mu, logvar, means, logvars, logits):
    """``(log_ratio, log_prior_sum)``, each ``[S, B]`` in the accumulation dtype."""
    n_samples, batch, latent_size = z.shape
    acc = accumulation_dtype(z)
    tables, log_norm, _ = _tables(means, logvars, logits, acc)
    log_ratio = z.new_empty((n_samples, batch), dtype=acc)
    log_prior_sum = torch.empty_like(log_ratio)
    rows = n_samples * batch
    if rows:
        config = _row_config(rows, means.shape[0])
        launch(_forward_kernel, (triton.cdiv(rows, config.meta["BLOCK_R"]),), config, z, mu,
               logvar, tables, log_norm, log_ratio, log_prior_sum,
               (rows, batch, latent_size, means.shape[0]), ACC=_acc_type(acc),
               BLOCK_D=_dims_block(latent_size))
    return log_ratio, log_prior_sum


def _component_grads(z, tables, grad, log_prior_sum, needs, sizes, acc):
    """Runs the backward's component stream; returns the z scratch (None when z's gradient is
    not wanted) and the partial sums totalled over programs (None when no component gradient
    is)."""
    rows, _, latent_size, n_components = sizes
    config = _row_config(rows, n_components)
    blocks = triton.cdiv(rows, config.meta["BLOCK_R"])
    columns = (2 * latent_size + 1) * n_components + 1
    programs = max(1, min(blocks, resident_programs(z.device), _PARTIAL_ELEMENTS // columns))
    z_sum = z.new_zeros((rows, latent_size), dtype=acc) if needs[0] else None
    partials = z.new_zeros((programs, columns), dtype=acc) if any(needs[3:]) else None
    if rows and (needs[0] or any(needs[3:])):
        launch(_backward_kernel, (programs,), config, z, grad, log_prior_sum, tables, z_sum,
               partials, sizes, ACC=_acc_type(acc))
    return z_sum, None if partials is None else partials.sum(0)


def _latent_grads(inputs, z_sum, grad, needs):
    """The gradients of z, mu and logvar (None where not wanted)."""
    z = inputs[0]
    grads = tuple(torch.empty_like(t) if need else None for t, need in zip(inputs, needs))
    n_samples, batch, latent_size = z.shape
    if any(needs) and batch and latent_size:
        config = _latent_config(batch, latent_size)
        grid = (triton.cdiv(batch, config.meta["BLOCK_B"]),
                triton.cdiv(latent_size, config.meta["BLOCK_D"]))
        launch(_latent_grads_kernel, grid, config, inputs, grads, z_sum, grad,
               (n_samples, batch, latent_size), ACC=_acc_type(accumulation_dtype(z)))
    return grads


def _split_totals(totals, inputs, needs, weights):
    """The component gradients (slots 3-5) from the partial sums totalled over all rows."""
    means = inputs[3]
    n_components, latent_size = means.shape
    table = latent_size * n_components
    sums = (totals[:table].view(latent_size, n_components).t(),
            totals[table:2 * table].view(latent_size, n_components).t(),
            totals[2 * table:2 * table + n_components] + weights * totals[-1])
    # Copied into fresh outputs: the sums are views of one buffer, which outputs must not share.
    return tuple(torch.empty_like(t).copy_(s) if need else None
                 for s, t, need in zip(sums, inputs[3:], needs))


def mixture_log_ratio_backward(grad, z, mu, logvar, means, logvars, logits, log_prior_sum,
                               needs_grad):
    """The six gradients of (z, mu, logvar, means, logvars, logits), empty where not needed."""
    inputs = (z, mu, logvar, means, logvars, logits)
    needs = [bool(need) for need in needs_grad]
    acc = accumulation_dtype(z)
    tables, _, weights = _tables(means, logvars, logits, acc)
    sizes = (z.shape[0] * z.shape[1], z.shape[1], z.shape[2], means.shape[0])
    grad, log_prior_sum = grad.to(acc).contiguous(), log_prior_sum.to(acc).contiguous()
    z_sum, totals = _component_grads(z, tables, grad, log_prior_sum, needs, sizes, acc)
    grads = _latent_grads(inputs[:3], z_sum, grad, needs[:3])
    grads += (None,) * 3 if totals is None else _split_totals(totals, inputs, needs[3:], weights)
    return tuple(z.new_empty(0) if g is None else g for g in grads)
