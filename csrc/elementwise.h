// Per-element loss terms and their gradients (DESIGN.md §1), shared by the CPU and CUDA
// kernels. T is float/double on CUDA and also Vectorized<float>/<double> on the CPU.
#pragma once

#include "math_ops.h"

FASTVAE_NAMESPACE_BEGIN

constexpr double kLog2Pi = 1.8378770664093453;  // log(2π)

// Gaussian NLL of x under N(mean, e^logvar) and its gradients, given precision = e^-logvar
// (computed apart so a kernel can form it once per broadcast value or in a separate sweep).
template <typename T>
FASTVAE_HD void gaussian_nll_with_precision(T x, T mean, T logvar, T precision, T& nll, T& grad_x,
                                            T& grad_mean, T& grad_logvar) {
  const T residual = x - mean;
  const T scaled_square = residual * residual * precision;
  nll = constant<T>(0.5) * (scaled_square + logvar + constant<T>(kLog2Pi));
  grad_x = residual * precision;
  grad_mean = (mean - x) * precision;
  grad_logvar = constant<T>(0.5) * (constant<T>(1.0) - scaled_square);
}

template <typename T>
FASTVAE_HD T gaussian_precision(T logvar) {
  return MathOps<T>::exp(T(0) - logvar);
}

template <typename T>
FASTVAE_HD void gaussian_nll(T x, T mean, T logvar, T& nll, T& grad_x, T& grad_mean,
                             T& grad_logvar) {
  gaussian_nll_with_precision(x, mean, logvar, gaussian_precision(logvar), nll, grad_x, grad_mean,
                              grad_logvar);
}

// Bernoulli NLL of x given logits, softplus(l) - x*l in the stable form, and its gradients.
template <typename T>
FASTVAE_HD void bernoulli_nll(T x, T logits, T& nll, T& grad_x, T& grad_logits) {
  using M = MathOps<T>;
  const T softplus = M::max(logits, T(0)) + M::log1p(M::exp(T(0) - M::abs(logits)));
  nll = softplus - x * logits;
  grad_x = T(0) - logits;
  grad_logits = constant<T>(1.0) / (constant<T>(1.0) + M::exp(T(0) - logits)) - x;
}

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

// z = mu + exp(½·logvar)·eps.
template <typename T>
FASTVAE_HD T reparameterized_sample(T mu, T logvar, T eps) {
  return mu + MathOps<T>::exp(constant<T>(0.5) * logvar) * eps;
}

FASTVAE_NAMESPACE_END
