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
enum class Likelihood : int64_t { kGaussian = 0, kBernoulli = 1, kLaplace = 2 };
constexpr int64_t kLikelihoodCount = 3;

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

// Calls visit(GaussianNll{}) etc. for the likelihood chosen at run time; the kernels are
// templates over the struct, so the choice is made once per call, not per element.
template <typename Visit>
decltype(auto) with_likelihood(Likelihood likelihood, Visit&& visit) {
  switch (likelihood) {
    case Likelihood::kBernoulli: return visit(BernoulliNll{});
    case Likelihood::kLaplace: return visit(LaplaceNll{});
    default: return visit(GaussianNll{});
  }
}

FASTVAE_NAMESPACE_END
