// The mixture prior's maths shared by the CPU and CUDA kernels (T is float/double, and on the
// CPU also Vectorized<float>/<double>, one component per lane).
#pragma once

#include <limits>

#include "math_ops.h"

FASTVAE_NAMESPACE_BEGIN

// log Σ exp(x) over a stream of values, in one pass: a running maximum and the sum of
// exp(x − maximum), rescaled whenever the maximum grows. Without branches, so that it also runs
// per lane of a Vectorized<T> (elementwise.h's OnlineLogSumExp branches, and serves scalars).
// The maximum starts at the lowest finite value rather than −inf, so that a stream of −inf
// alone (the padding components) keeps a zero sum instead of producing exp(−inf − (−inf)) = NaN.
template <typename T>
struct BranchlessLogSumExp {
  using Scalar = typename MathOps<T>::Scalar;
  T maximum = constant<T>(-std::numeric_limits<Scalar>::max());
  T sum = constant<T>(0.0);

  // Adds `count` · exp(value) (count 1 for a single value; another stream's sum to merge it).
  FASTVAE_HD void add(T value, T count) {
    using M = MathOps<T>;
    const T larger = M::max(maximum, value);
    sum = sum * M::exp(maximum - larger) + count * M::exp(value - larger);
    maximum = larger;
  }
  FASTVAE_HD void add(T value) { add(value, constant<T>(1.0)); }
  FASTVAE_HD void merge(const BranchlessLogSumExp& other) { add(other.maximum, other.sum); }
  FASTVAE_HD T value() const { return maximum + MathOps<T>::log(sum); }
};

// ∂/∂v log N(z; m, e^v) = ½((z − m)²e^−v − 1), from the residual z − m and the scaled residual
// (z − m)e^−v (which is itself −∂/∂z log N and ∂/∂m log N).
template <typename T>
FASTVAE_HD T log_variance_gradient(T residual, T scaled) {
  return constant<T>(0.5) * (residual * scaled - constant<T>(1.0));
}

FASTVAE_NAMESPACE_END
