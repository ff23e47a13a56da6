"""Conversions between storage and accumulation types, exact on GPU and in the interpreter.

Storage dtypes are float16, bfloat16, float32 and float64; accumulation is float32 or float64.
16-bit values always pass through float32, as PyTorch's own conversions do: widening is then
exact, and narrowing from float64 rounds the way ``tensor.to(torch.bfloat16)`` does. The Triton
interpreter (3.9) stores bfloat16 as raw uint16 bits: it converts bfloat16 to float64 as an
integer and rounds float32 to bfloat16 towards zero, so there the rounding is done on the bits.
"""
import triton
import triton.language as tl

from ._launch import INTERPRETED

_ROUND_ON_BITS = tl.constexpr(INTERPRETED)


@triton.jit
def widen(value, ACC: tl.constexpr):
    """``value`` in the accumulation type ``ACC``, exactly."""
    if value.dtype.primitive_bitwidth == 16:
        value = value.to(tl.float32)
    return value.to(ACC)


@triton.jit
def _bfloat16_nearest_even(value):
    bits = value.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def narrow(value, DTYPE: tl.constexpr):
    """``value`` rounded to nearest-even in the storage type ``DTYPE``."""
    if DTYPE.primitive_bitwidth == 16:
        value = value.to(tl.float32)
        if DTYPE == tl.bfloat16 and _ROUND_ON_BITS:
            return _bfloat16_nearest_even(value)
    return value.to(DTYPE)
