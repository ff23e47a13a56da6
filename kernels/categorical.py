"""The categorical likelihood: per position the NLL ``logsumexp_k ℓ_k − ℓ_t`` and the gradient
``w_b/S·(softmax(ℓ) − onehot(t))``, formed in one pass as Liger-Kernel's cross-entropy does.

Work layout (deterministic: per-program partials summed in a fixed order, no atomics):

* ``_categorical_kernel``: program ``(s·B + b)·T + t`` takes the ``BLOCK_P`` positions of tile
  t of row b in sample s, as a ``[BLOCK_P, BLOCK_K]`` tile over classes. A first loop over the
  classes keeps a running max and rescaled sum per position (an online log-sum-exp: K bounds
  no register), picks the target's logit by a direct load and stores the tile's NLL sum to
  ``partial[s, b, t]``; a second loop, over the same logits (from cache), writes the gradient.
  Classes last (``[S, B, D, K]``): the tile is a few positions by many contiguous classes.
  Class-second (``[S, B, K, D]``): many contiguous positions by a few classes, so each load is
  a coalesced run along D. The layout is the constexpr ``CLASSES_LAST``; its unit stride is a
  constant, so the loads are vectorised either way.
* ``_categorical_rows_kernel`` adds each row's partials in (sample, tile) order.
"""
import functools

import torch
import triton
import triton.language as tl

from .._common import Reduction, accumulation_dtype, reduce_rows
from ._convert import narrow, widen
from ._launch import LaunchConfig, launch, streaming_warps, tunable, warp_stage_candidates

# Logits per tile (BLOCK_P × BLOCK_K): 8 per thread at 8 warps, a few registers each.
_TILE = 2048
_MAX_CLASS_BLOCK = 1024  # classes last: the longest run of classes per step
_MAX_POSITION_BLOCK = 128  # class-second: the longest run of positions per tile
_ROWS_BLOCK = 128
_ROWS_CONFIG = LaunchConfig(dict(BLOCK=_ROWS_BLOCK), 4)


@triton.jit
def _offsets(position, classes_index, features, classes, CLASSES_LAST: tl.constexpr):
    """Element offsets within one (s, b) block of the logits, for the given positions and
    classes (broadcast against each other)."""
    if CLASSES_LAST:
        offset = position * classes + classes_index
    else:
        offset = classes_index * features + position
    return offset


@triton.jit
def _log_total(logits, position, in_row, features, classes, CLASSES_LAST: tl.constexpr,
               ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """logsumexp over the classes of each position, by a running max and a sum rescaled to it
    once per block of classes. Positions outside the row get 0."""
    top = tl.full((BLOCK_P,), float("-inf"), ACC)
    total = tl.zeros((BLOCK_P,), ACC)
    for first in range(0, classes, BLOCK_K):
        index = first + tl.arange(0, BLOCK_K)
        mask = in_row[:, None] & (index < classes)[None, :]
        offset = _offsets(position[:, None], index[None, :], features, classes, CLASSES_LAST)
        x = widen(tl.load(logits + offset, mask=mask, other=float("-inf")), ACC)
        new_top = tl.maximum(top, tl.max(x, axis=1))
        # While a position has seen only -inf its shift is 0: no inf − inf.
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        top = new_top
    shift = tl.where(top == float("-inf"), 0.0, top)
    return tl.where(in_row, shift + tl.log(tl.where(in_row, total, 1.0)), 0.0)


@triton.jit
def _gradient(logits, grad, position, in_row, target, log_total, weight, features, classes,
              CLASSES_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr):
    """weight·(softmax − onehot(target)) for every class of the tile's positions."""
    for first in range(0, classes, BLOCK_K):
        index = first + tl.arange(0, BLOCK_K)
        mask = in_row[:, None] & (index < classes)[None, :]
        offset = _offsets(position[:, None], index[None, :], features, classes, CLASSES_LAST)
        x = widen(tl.load(logits + offset, mask=mask, other=0.0), ACC)
        hit = (index[None, :] == target[:, None]).to(ACC)
        value = (tl.exp(x - log_total[:, None]) - hit) * weight[:, None]
        tl.store(grad + offset, narrow(value, grad.dtype.element_ty), mask=mask)


@tunable(key=["sizes"], candidates=warp_stage_candidates())
@triton.jit
def _categorical_kernel(logits_ptr, target_ptr, grad_ptr, grad_scale_ptr, partial_ptr, sizes,
                        uniform_weight: tl.float64, CLASSES_LAST: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """``sizes``: (B, S, D, K); ``grad_ptr``/``grad_scale_ptr`` None when not wanted/given;
    ``partial_ptr``: ``[S, B, tiles]`` NLL sums."""
    batch, n_samples, features, classes = sizes[0], sizes[1], sizes[2], sizes[3]
    program = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(features, BLOCK_P)
    row = program // tiles  # s·B + b
    b = row % batch
    position = (program % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_row = position < features
    target = tl.load(target_ptr + b * features + position, mask=in_row, other=0).to(tl.int64)
    valid = in_row & (target >= 0) & (target < classes)
    logits = logits_ptr + row * features * classes
    log_total = _log_total(logits, position, in_row, features, classes, CLASSES_LAST, ACC,
                           BLOCK_P, BLOCK_K)
    # The target's logit by a direct load: a target outside [0, K) is never read.
    picked = widen(tl.load(logits + _offsets(position, target, features, classes, CLASSES_LAST),
                           mask=valid, other=0.0), ACC)
    nll = tl.where(valid, log_total - picked, float("nan"))
    tl.store(partial_ptr + program, tl.sum(tl.where(in_row, nll, 0.0), axis=0))
    if grad_ptr is not None:
        if grad_scale_ptr is None:
            row_weight = tl.full((), uniform_weight, ACC)
        else:
            row_weight = widen(tl.load(grad_scale_ptr + b), ACC)
        weight = tl.where(valid, row_weight / n_samples, float("nan"))
        _gradient(logits, grad_ptr + row * features * classes, position, in_row, target,
                  log_total, weight, features, classes, CLASSES_LAST, ACC, BLOCK_K)


@triton.jit
def _categorical_rows_kernel(nll_ptr, partial_ptr, batch, n_samples, tiles, ACC: tl.constexpr,
                             BLOCK: tl.constexpr):
    """nll[b] = Σ over samples and tiles (in that order) of partial[s, b, t], over S."""
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = b < batch
    total = tl.zeros((BLOCK,), ACC)
    for sample in range(n_samples):
        first = (tl.cast(sample, tl.int64) * batch + b) * tiles
        for tile in range(tiles):
            total += tl.load(partial_ptr + first + tile, mask=valid, other=0.0)
    tl.store(nll_ptr + b, total / n_samples, mask=valid)


@functools.lru_cache(maxsize=512)
def _plan(features: int, classes: int, classes_last: bool):
    """(positions per tile, the main launch config) for a shape class."""
    if classes_last:
        block_k = min(triton.next_power_of_2(classes), _MAX_CLASS_BLOCK)
        block_p = min(max(1, _TILE // block_k), triton.next_power_of_2(max(features, 1)))
    else:
        block_p = min(triton.next_power_of_2(max(features, 1)), _MAX_POSITION_BLOCK)
        block_k = min(max(1, _TILE // block_p), triton.next_power_of_2(classes))
    config = LaunchConfig(dict(BLOCK_P=block_p, BLOCK_K=block_k),
                          streaming_warps(block_p * block_k))
    return block_p, config


def categorical(logits, target, grad_scale, classes_last, reduction, needs_grad):
    """The categorical likelihood; arguments, shapes and outputs as the reference backend's
    ``categorical``."""
    n_samples, batch = logits.shape[:2]
    classes, features = (logits.shape[3], logits.shape[2]) if classes_last else logits.shape[2:]
    acc = accumulation_dtype(logits)
    acc_type = tl.float64 if acc == torch.float64 else tl.float32
    grad = torch.empty_like(logits) if needs_grad[0] else None
    nll = torch.zeros(batch, dtype=acc, device=logits.device)
    block_p, config = _plan(features, classes, bool(classes_last))
    tiles = -(-features // block_p)
    if batch and tiles:
        partial = torch.empty(n_samples * batch * tiles, dtype=acc, device=logits.device)
        uniform_weight = 1.0 / batch if reduction == Reduction.MEAN else 1.0
        launch(_categorical_kernel, (n_samples * batch * tiles,), config, logits, target, grad,
               grad_scale, partial, (batch, n_samples, features, classes), uniform_weight,
               CLASSES_LAST=bool(classes_last), ACC=acc_type)
        launch(_categorical_rows_kernel, (-(-batch // _ROWS_BLOCK),), _ROWS_CONFIG, nll,
               partial, batch, n_samples, tiles, ACC=acc_type)
    loss = reduce_rows(nll.clone(), reduction)  # a tensor of its own, also for 'none'
    return loss, nll, grad if grad is not None else logits.new_empty(0)
