// The CPU kernels' entry points. Their translation units are compiled once per instruction set
// (CMakeLists.txt: AVX2 and AVX-512), each copy in its own namespace (math_ops.h); dispatch.cpp
// registers the copy that matches the machine.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>
#include <tuple>

#include "../math_ops.h"

namespace fastvae {
using ElboOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
}  // namespace fastvae

#define FASTVAE_CPU_KERNELS                                                                     \
  at::Tensor reparameterize_cpu(const at::Tensor& mu, const at::Tensor& logvar,                \
                                const at::Tensor& seed, int64_t n_samples);                    \
  std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cpu(                              \
      const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed,              \
      int64_t n_samples, bool need_mu, bool need_logvar);                                      \
  ElboOutputs elbo_cpu(const at::Tensor& x, const at::Tensor& x_hat,                           \
                       const std::optional<at::Tensor>& x_logvar, double x_logvar_const,       \
                       const at::Tensor& mu, const at::Tensor& logvar,                         \
                       const std::optional<at::Tensor>& prior_mu,                              \
                       const std::optional<at::Tensor>& prior_logvar, const at::Tensor& beta,  \
                       double free_bits, bool bernoulli, std::string_view reduction,           \
                       const std::optional<at::Tensor>& grad_scale,                            \
                       std::array<bool, 7> needs_grad);

#if defined(CPU_CAPABILITY)
FASTVAE_NAMESPACE_BEGIN
FASTVAE_CPU_KERNELS
FASTVAE_NAMESPACE_END
#endif
