// The CPU kernels' entry points. Their translation units are compiled once per instruction set
// (CMakeLists.txt: AVX2 and AVX-512), each copy in its own namespace (math_ops.h); dispatch.cpp
// registers the copy that matches the machine.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../categorical_args.h"
#include "../elbo_args.h"
#include "../iwae_args.h"
#include "../math_ops.h"

#define FASTVAE_CPU_KERNELS                                                                  \
  at::Tensor reparameterize_cpu(const at::Tensor& mu, const at::Tensor& logvar,             \
                                const at::Tensor& seed, int64_t n_samples);                 \
  std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cpu(                           \
      const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed,           \
      int64_t n_samples, bool need_mu, bool need_logvar);                                   \
  ElboOutputs elbo_cpu(const ElboArgs& args);                                               \
  IwaeOutputs iwae_cpu(const IwaeArgs& args);                                               \
  void scale_cpu(at::TensorList grads, const at::Tensor& upstream);                         \
  CategoricalOutputs categorical_cpu(const CategoricalArgs& args);                          \
  at::Tensor philox_normals_cpu(const at::Tensor& seed, int64_t first_call, int64_t count); \
  int64_t parallel_threads_cpu();

#if defined(CPU_CAPABILITY)
FASTVAE_NAMESPACE_BEGIN
FASTVAE_CPU_KERNELS
FASTVAE_NAMESPACE_END
#endif
