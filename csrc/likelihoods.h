// The decoder likelihoods p(x | x̂, θ): per-element NLL and its gradients, shared by the CPU
// and CUDA kernels (T is float/double, and on the CPU also Vectorized<float>/<double>).
//
// Adding a likelihood touches this file only (plus the Python side): a value in `Likelihood`,
// a struct with the interface below, and a case in with_likelihood.
#pragma once

#include <cstdint>

#include "math_ops.h"

namespace fastvae {

// Mirrors fastvae._common.Likelihood; the op takes the value as an int. Outside the
// per-instruction-set namespaces, so every translation unit sees one type.
enum class Likelihood : int64_t {
  kGaussian = 0, kBernoulli = 1, kLaplace = 2, kContinuousBernoulli = 3 };
constexpr int64_t kLikelihoodCount = 4;

constexpr double kLog2Pi = 1.8378770664093453;  // log(2π)
constexpr double kLog2 = 0.6931471805599453;    // log(2)

}  // namespace fastvae

FASTVAE_NAMESPACE_BEGIN

// One element's NLL and its partial derivatives with respect to x, x̂ and θ.
template <typename T>
struct NllTerms {
  T nll, grad_x, grad_x_hat, grad_log_scale;
};

// e^-θ: the inverse of the scale e^θ (1/σ² for the Gaussian, 1/b for the Laplace). Kernels form
// it apart from the terms, once per broadcast θ or in a sweep ahead of the main loop: exp is an
// out-of-line call on the CPU, and a call inside the main loop spills its many live vectors.
template <typename T>
FASTVAE_HD T inverse_scale(T log_scale) {
  return MathOps<T>::exp(T(0) - log_scale);
}

// Every likelihood: kUsesScale (whether θ enters) and terms(x, x̂, θ, e^-θ).

// Gaussian N(x̂, e^θ), θ = log σ².
struct GaussianNll {
  static constexpr bool kUsesScale = true;
  template <typename T>
  static FASTVAE_HD NllTerms<T> terms(T x, T mean, T log_scale, T inv_scale) {
    const T residual = x - mean;
    const T scaled_square = residual * residual * inv_scale;
    return {constant<T>(0.5) * (scaled_square + log_scale + constant<T>(kLog2Pi)),
            residual * inv_scale, (mean - x) * inv_scale,
            constant<T>(0.5) * (constant<T>(1.0) - scaled_square)};
  }
};

// Bernoulli with logits x̂: softplus(x̂) − x·x̂ in the stable form; θ is not used.
struct BernoulliNll {
  static constexpr bool kUsesScale = false;
  template <typename T>
  static FASTVAE_HD NllTerms<T> terms(T x, T logits, T, T) {
    using M = MathOps<T>;
    const T softplus = M::max(logits, T(0)) + M::log1p(M::exp(T(0) - M::abs(logits)));
    const T probability = constant<T>(1.0) / (constant<T>(1.0) + M::exp(T(0) - logits));
    return {softplus - x * logits, T(0) - logits, probability - x, T(0)};
  }
};

// Laplace with location x̂ and scale b = e^θ; sign(0) = 0.
struct LaplaceNll {
  static constexpr bool kUsesScale = true;
  template <typename T>
  static FASTVAE_HD NllTerms<T> terms(T x, T location, T log_scale, T inv_scale) {
    using M = MathOps<T>;
    const T residual = x - location;
    const T scaled_distance = M::abs(residual) * inv_scale;
    const T grad_x = M::sign(residual) * inv_scale;
    return {scaled_distance + log_scale + constant<T>(kLog2), grad_x, T(0) - grad_x,
            constant<T>(1.0) - scaled_distance};
  }
};

// The continuous Bernoulli's switch point and series (fastvae._common.CB_SWITCH, CB_SERIES):
// c_n = B_2n/(2n)! (B the Bernoulli numbers), n = 1..16, the Taylor coefficients of
// (ℓ/2)·coth(ℓ/2) = 1 + Σ c_n ℓ^2n.
constexpr double kContinuousBernoulliSwitch = 2.0;
FASTVAE_HD constexpr double continuous_bernoulli_series(int index) {
  constexpr double c[] = {
      0.08333333333333333, -0.001388888888888889, 3.306878306878307e-05,
      -8.267195767195768e-07, 2.08767569878681e-08, -5.284190138687493e-10,
      1.3382536530684679e-11, -3.3896802963225827e-13, 8.586062056277845e-15,
      -2.174868698558062e-16, 5.5090028283602295e-18, -1.3954464685812522e-19,
      3.534707039629467e-21, -8.953517427037546e-23, 2.267952452337683e-24,
      -5.744790668872202e-26};
  return c[index];
}

// Continuous Bernoulli with logits ℓ = x̂ (Loaiza-Ganem & Cunningham 2019); θ is not used.
// NLL = softplus(ℓ) − x·ℓ − log C(ℓ), C(ℓ) = ℓ/tanh(ℓ/2), which simplifies to
//   (½ − x)·ℓ + L(ℓ), L(ℓ) = log(sinh(ℓ/2)/(ℓ/2));  ∂x = −ℓ,  ∂ℓ = ½ − x + D(ℓ),
//   D(ℓ) = L'(ℓ) = ½coth(ℓ/2) − 1/ℓ (= σ(ℓ) − ½ − 1/ℓ + 1/sinh ℓ).
// Below |ℓ| = 2 the series D = Σ c_n ℓ^(2n−1), L = Σ c_n/(2n) ℓ^2n (8 terms for float, 16 for
// double: truncation under half an ulp at 2); above it, with a = |ℓ| and e = e^−a,
// L = a/2 − log a + log1p(−e) and D = sign(ℓ)·((½ − 1/a) + e/(1 − e)), within ~2 ulps from 2
// on (the closed forms cancel like 12·eps/a² below it) and free of overflow for any a.
struct ContinuousBernoulliNll {
  static constexpr bool kUsesScale = false;

  // L and D from the series at ℓ (|ℓ| ≤ 2).
  template <typename T>
  static FASTVAE_HD void series(T logits, T& log_ratio, T& langevin) {
    constexpr int kTerms = sizeof(typename MathOps<T>::Scalar) == sizeof(float) ? 8 : 16;
    const T square = logits * logits;
    T log_sum = constant<T>(continuous_bernoulli_series(kTerms - 1) / (2 * kTerms));
    T sum = constant<T>(continuous_bernoulli_series(kTerms - 1));
    for (int n = kTerms - 1; n >= 1; --n) {
      log_sum = log_sum * square + constant<T>(continuous_bernoulli_series(n - 1) / (2 * n));
      sum = sum * square + constant<T>(continuous_bernoulli_series(n - 1));
    }
    log_ratio = log_sum * square;
    langevin = sum * logits;
  }

  template <typename T>
  static FASTVAE_HD NllTerms<T> terms(T x, T logits, T, T) {
    using M = MathOps<T>;
    const T cut = constant<T>(kContinuousBernoulliSwitch), one = constant<T>(1.0);
    const T half = constant<T>(0.5), size = M::abs(logits);
    // Each branch sees its argument clamped into its range (NaN kept), so both stay finite.
    T log_ratio, langevin;
    series(M::max(T(0) - cut, T(0) - M::max(T(0) - cut, T(0) - logits)), log_ratio, langevin);
    const T outer = M::max(cut, size), decay = M::exp(T(0) - outer);
    const T far_log_ratio = half * outer - M::log(outer) + M::log1p(T(0) - decay);
    const T far_langevin = M::sign(logits) * ((half - one / outer) + decay / (one - decay));
    // Weight 1 below the switch, 0 above, ½ at it (both branches are accurate there).
    const T near = half * (one + M::sign(cut - size)), far = one - near;
    const T half_minus_x = half - x;
    return {half_minus_x * logits + (near * log_ratio + far * far_log_ratio), T(0) - logits,
            half_minus_x + (near * langevin + far * far_langevin), T(0)};
  }
};

// Calls visit(GaussianNll{}) etc. for the likelihood chosen at run time; the kernels are
// templates over the struct, so the choice is made once per call, not per element.
template <typename Visit>
decltype(auto) with_likelihood(Likelihood likelihood, Visit&& visit) {
  switch (likelihood) {
    case Likelihood::kBernoulli: return visit(BernoulliNll{});
    case Likelihood::kLaplace: return visit(LaplaceNll{});
    case Likelihood::kContinuousBernoulli: return visit(ContinuousBernoulliNll{});
    default: return visit(GaussianNll{});
  }
}

// Whether θ enters the likelihood (its gradient is zero otherwise).
inline bool uses_scale(Likelihood likelihood) {
  return with_likelihood(likelihood, [](auto nll) { return decltype(nll)::kUsesScale; });
}

FASTVAE_NAMESPACE_END
