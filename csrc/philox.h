// The noise stream of docs/design.md §3: Triton's tl.randn4x, shared by the CPU and CUDA kernels.
#pragma once

#include "math_ops.h"

FASTVAE_NAMESPACE_BEGIN

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// Philox4x32-10 on the counter (offset_lo, offset_hi, 0, 0) with key (seed_lo, seed_hi).
// Plain scalar code: the CPU build runs it over arrays of lanes, which the compiler vectorises.
FASTVAE_HD void philox4x32_10(uint64_t seed, uint64_t offset, uint32_t& c0, uint32_t& c1,
                              uint32_t& c2, uint32_t& c3) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  c0 = static_cast<uint32_t>(offset);
  c1 = static_cast<uint32_t>(offset >> 32);
  c2 = 0;
  c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
    c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(product_b);
    c3 = static_cast<uint32_t>(product_a);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

// Triton's uint_to_uniform_float: the word as int32, negatives folded with ~x, times the
// largest float32 scale keeping INT32_MAX * scale below 1.
FASTVAE_HD float philox_uniform(uint32_t word) {
  int32_t value = static_cast<int32_t>(word);
  value = value < 0 ? ~value : value;
  return static_cast<float>(value) * 4.6566127342e-10f;
}

// Box–Muller on a uniform pair, in float32 as Triton computes it (u1 clamped at 1e-7).
template <typename F>
FASTVAE_HD void box_muller(F u1, F u2, F& normal1, F& normal2) {
  using M = MathOps<F>;
  const F radius = M::sqrt(F(-2.0f) * M::log(M::max(u1, F(1.0e-7f))));
  const F angle = F(6.283185307179586f) * u2;
  normal1 = radius * M::cos(angle);
  normal2 = radius * M::sin(angle);
}

// Number of Philox calls for a stream of `numel` normals: output j of call q is element j*Q + q.
FASTVAE_HD int64_t philox_quarter(int64_t numel) { return (numel + 3) / 4; }

FASTVAE_NAMESPACE_END
