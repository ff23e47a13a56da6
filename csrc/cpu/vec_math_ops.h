// MathOps for ATen's Vectorized types, so the shared formulas run a vector at a time on the CPU.
// exp/log/log1p/sin/cos are ATen's Sleef-backed versions (within 1 ulp).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "../math_ops.h"

FASTVAE_NAMESPACE_BEGIN

template <typename S>
struct VectorizedMathOps {
  using V = at::vec::Vectorized<S>;
  using Scalar = S;
  static V exp(const V& x) { return x.exp(); }
  static V log(const V& x) { return x.log(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V sqrt(const V& x) { return x.sqrt(); }
  static V cos(const V& x) { return x.cos(); }
  static V sin(const V& x) { return x.sin(); }
  static V abs(const V& x) { return x.abs(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // gt/lt give 1 or 0 per lane, so this is -1, 0 or +1 as the scalar version.
  static V sign(const V& x) { return x.gt(V(S(0))) - x.lt(V(S(0))); }
};

template <>
struct MathOps<at::vec::Vectorized<float>> : VectorizedMathOps<float> {};
template <>
struct MathOps<at::vec::Vectorized<double>> : VectorizedMathOps<double> {};

FASTVAE_NAMESPACE_END
