"""``scale_``: gradients formed with a unit upstream gradient, times the actual one, in place.

One launch covers every gradient of the call (a tuple of pointers, unrolled at compile time).
Program ``(c, r)`` handles block ``c`` of the rows ``r, r + R, …`` of every gradient, seen as
``[L, B, T]`` (rows in dim 1; a 0-dim upstream is one row: ``[1, 1, numel]``). Each row first
loads its upstream weight and skips the row when it is 1: a plain ``loss.backward()`` costs one
launch that reads one scalar per program, with no host sync, so CUDA-graph capture and replay
see the same work.
"""
import triton
import triton.language as tl

from ._convert import narrow, widen
from ._launch import LaunchConfig, block_for, launch, streaming_warps

_BLOCKS = (128, 2048)
_MAX_GRID_ROWS = 65535  # CUDA's limit on grid dim 1; programs loop over the rows beyond it


@triton.jit
def _scale_row(grad_ptr, lengths, row, rows, upstream, block, BLOCK: tl.constexpr):
    """Block ``block`` of row ``row`` of one ``[L, rows, T]`` gradient, times upstream,
    applied in the gradient's accumulation type."""
    samples, length = lengths[0], lengths[1]
    ACC: tl.constexpr = tl.float64 if grad_ptr.dtype.element_ty == tl.float64 else tl.float32
    factor = upstream.to(ACC)
    element = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = element < length
    for sample in range(samples):
        offset = (tl.cast(sample, tl.int64) * rows + row) * length + element
        grad = widen(tl.load(grad_ptr + offset, mask=in_row), ACC)
        tl.store(grad_ptr + offset, narrow(grad * factor, grad_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _scale_kernel(grads, lengths, upstream_ptr, rows, BLOCK: tl.constexpr):
    """``grads``: a tuple of pointers; ``lengths``: per gradient its (L, T)."""
    block = tl.program_id(0)
    for row_index in range(tl.program_id(1), rows, tl.num_programs(1)):
        row = tl.cast(row_index, tl.int64)
        # Tested in upstream's own dtype, so that no gradient is left unscaled by a rounding tie.
        upstream = tl.load(upstream_ptr + row)
        if upstream != 1.0:
            for index in tl.static_range(len(grads)):
                _scale_row(grads[index], lengths[index], row, rows, upstream, block, BLOCK)


def scale_(grads, upstream):
    """In place: every element of ``grads`` becomes ``g * upstream`` (see the reference
    backend's contract); nothing is read from the device on the host."""
    per_row = upstream.dim() == 1
    rows = upstream.shape[0] if per_row else 1
    lengths = tuple((g.shape[0], g.shape[2]) if per_row else (1, g.numel()) for g in grads)
    longest = max((length for _, length in lengths), default=0)
    if not rows or not longest:
        return
    block = min(block_for(longest * rows, *_BLOCKS), triton.next_power_of_2(longest))
    config = LaunchConfig(dict(BLOCK=block), num_warps=streaming_warps(block))
    grid = (triton.cdiv(longest, block), min(rows, _MAX_GRID_ROWS))
    launch(_scale_kernel, grid, config, tuple(grads), lengths, upstream, rows)
