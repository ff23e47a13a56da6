// Per-element latent terms (the KL and its gradients, the importance weight's density ratio, the
// reparameterised sample), shared by the CPU and CUDA kernels; the decoder likelihoods are in
// likelihoods.h. T is float/double on CUDA and also Vectorized<float>/<double> on the CPU.
#pragma once

#include <limits>

#include "math_ops.h"

FASTVAE_NAMESPACE_BEGIN

// KL(N(mu, e^logvar) || N(0, 1)).
template <typename T>
FASTVAE_HD void standard_kl(T mu, T logvar, T& kl, T& grad_mu, T& grad_logvar) {
  using M = MathOps<T>;
  const T variance = M::exp(logvar);
  kl = constant<T>(0.5) * (mu * mu + variance - constant<T>(1.0) - logvar);
  grad_mu = mu;
  grad_logvar = constant<T>(0.5) * (variance - constant<T>(1.0));
}

// KL(N(mu, e^logvar) || N(prior_mu, e^prior_logvar)); d/dprior_mu = -grad_mu.
template <typename T>
FASTVAE_HD void prior_kl(T mu, T logvar, T prior_mu, T prior_logvar, T& kl, T& grad_mu,
                         T& grad_logvar, T& grad_prior_logvar) {
  using M = MathOps<T>;
  const T variance = M::exp(logvar);
  const T diff = mu - prior_mu;
  const T inv_prior_variance = M::exp(T(0) - prior_logvar);
  const T spread = (variance + diff * diff) * inv_prior_variance;
  kl = constant<T>(0.5) * (prior_logvar - logvar + spread - constant<T>(1.0));
  grad_mu = diff * inv_prior_variance;
  grad_logvar = constant<T>(0.5) * (variance * inv_prior_variance - constant<T>(1.0));
  grad_prior_logvar = constant<T>(0.5) * (constant<T>(1.0) - spread);
}

// One latent element of a sample z of q(z|x) = N(μ, e^λ) under the prior N(m, e^v): the log
// density ratio log p(z) − log q(z|x) without the log 2π that cancels, and the derivatives of
// its negative (the importance-weighted loss's sign) with respect to z, μ, λ, m and v.
template <typename T>
struct DensityRatioTerms {
  T ratio, grad_z, grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar;
};

// inv_var = e^−λ and prior_inv_var = e^−v come in formed, once per row rather than per sample;
// the standard normal prior is m = v = 0, e^−v = 1 (exact: the terms are then those of N(0, 1)).
template <typename T>
FASTVAE_HD DensityRatioTerms<T> density_ratio_terms(T z, T mu, T logvar, T inv_var, T prior_mu,
                                                    T prior_logvar, T prior_inv_var) {
  const T half = constant<T>(0.5), one = constant<T>(1.0);
  const T q_residual = z - mu, q_scaled = q_residual * inv_var;
  const T p_residual = z - prior_mu, p_scaled = p_residual * prior_inv_var;
  const T q_square = q_residual * q_scaled, p_square = p_residual * p_scaled;
  return {half * (q_square + logvar - p_square - prior_logvar), p_scaled - q_scaled, q_scaled,
          half * (q_square - one), T(0) - p_scaled, half * (one - p_square)};
}

// log Σ e^v over a stream of values without overflow: a running maximum and the sum of
// e^(v − maximum), rescaled whenever the maximum rises. Nothing per value is kept, so the number
// of values (the importance samples, the classes) is not bounded. Scalars only (it branches).
template <typename T>
struct OnlineLogSumExp {
  T maximum = -std::numeric_limits<T>::infinity();
  T sum = 0;

  FASTVAE_HD void add(T value) {
    if (value > maximum) {
      sum = sum * MathOps<T>::exp(maximum - value) + T(1);
      maximum = value;
    } else if (value != -std::numeric_limits<T>::infinity()) {  // e^-inf adds nothing; NaN stays
      sum += MathOps<T>::exp(value - maximum);
    }
  }
  // Takes in another stream's state, as if its values had been added here: how a reduction
  // (a warp's shuffles) joins partial streams. Commutative to the bit, so every lane of a
  // shuffle tree ends with the same state.
  FASTVAE_HD void merge(const OnlineLogSumExp& other) {
    const T larger = maximum > other.maximum ? maximum : other.maximum;
    if (larger == -std::numeric_limits<T>::infinity()) {
      // Both streams empty (sum 0) or of NaNs only (sum NaN): e^(−inf − −inf) would be NaN.
      sum += other.sum;
      return;
    }
    sum = sum * MathOps<T>::exp(maximum - larger) +
          other.sum * MathOps<T>::exp(other.maximum - larger);
    maximum = larger;
  }
  FASTVAE_HD T total() const { return maximum + MathOps<T>::log(sum); }
};

// z = mu + exp(½·logvar)·eps.
template <typename T>
FASTVAE_HD T reparameterized_sample(T mu, T logvar, T eps) {
  return mu + MathOps<T>::exp(constant<T>(0.5) * logvar) * eps;
}

FASTVAE_NAMESPACE_END
