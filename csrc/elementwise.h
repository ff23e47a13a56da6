// Per-element latent terms (the KL and its gradients, the reparameterised sample), shared by the
// CPU and CUDA kernels; the decoder likelihoods are in likelihoods.h. T is float/double on CUDA
// and also Vectorized<float>/<double> on the CPU.
#pragma once

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

// z = mu + exp(½·logvar)·eps.
template <typename T>
FASTVAE_HD T reparameterized_sample(T mu, T logvar, T eps) {
  return mu + MathOps<T>::exp(constant<T>(0.5) * logvar) * eps;
}

FASTVAE_NAMESPACE_END
