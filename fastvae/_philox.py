"""The noise stream of docs/design.md §3 in plain PyTorch integer arithmetic.

Triton's ``tl.randn4x(seed, offset)`` with an int64 offset runs Philox4x32-10 on the counter
``(offset_lo, offset_hi, 0, 0)`` with key ``(seed_lo, seed_hi)``, maps each 32-bit word to a
float32 uniform and applies Box–Muller to the pairs (u1, u2) and (u3, u4). Element ``i`` of a
stream of ``N`` normals is output ``i // Q`` of the call at offset ``i % Q``, ``Q = ceil(N / 4)``.

uint32 values are held in int64 tensors; products are split into 16-bit halves so nothing
overflows. Everything stays on the seed's device and reads the seed as a tensor (no host sync).
"""
import math

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # largest float32 with INT32_MAX * scale < 1
_TWO_PI = 6.283185307179586


def _mul_hi_lo(constant: int, x: torch.Tensor):
    """High and low 32-bit words of ``constant * x`` for a uint32 constant and uint32 ``x``."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    p_lo = constant * x_lo  # < 2**48
    p_hi = constant * x_hi  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox4x32 rounds on uint32 values held in int64 tensors."""
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(word: torch.Tensor) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: the word as int32, negatives folded with ``~x``."""
    signed = torch.where(word >= 2**31, word - 2**32, word)
    folded = torch.where(signed < 0, -signed - 1, signed).to(torch.int32)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def _box_muller(u1: torch.Tensor, u2: torch.Tensor):
    radius = torch.sqrt(-2.0 * torch.log(torch.clamp(u1, min=1.0e-7)))
    angle = _TWO_PI * u2
    return radius * torch.cos(angle), radius * torch.sin(angle)


def normal_stream(seed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` float32 normals of the stream for ``seed`` (an int64 0-dim tensor)."""
    quarter = math.ceil(numel / 4)
    device = seed.device
    offsets = torch.arange(quarter, dtype=torch.int64, device=device)
    seed = seed.to(torch.int64)
    key_lo = (seed & _MASK32).expand(quarter)
    key_hi = ((seed >> 32) & _MASK32).expand(quarter)
    zeros = torch.zeros_like(offsets)
    words = philox4x32_10(offsets & _MASK32, offsets >> 32, zeros, zeros, key_lo, key_hi)
    u1, u2, u3, u4 = (_uniform(w) for w in words)
    n1, n2 = _box_muller(u1, u2)
    n3, n4 = _box_muller(u3, u4)
    return torch.cat([n1, n2, n3, n4])[:numel]
