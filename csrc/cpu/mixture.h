// The CPU entry points of the mixture log-ratio op pair (mixture.cpp), compiled per instruction
// set like those of kernels.h; dispatch.cpp registers the copy that matches the machine.
#pragma once

#include <ATen/core/Tensor.h>

#include "../math_ops.h"
#include "../mixture_args.h"

#define FASTVAE_CPU_MIXTURE_KERNELS                                                              \
  MixtureForward mixture_log_ratio_cpu(const at::Tensor& z, const at::Tensor& mu,               \
                                       const at::Tensor& logvar, const at::Tensor& means,       \
                                       const at::Tensor& logvars, const at::Tensor& logits);    \
  MixtureGrads mixture_log_ratio_backward_cpu(                                                  \
      const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu,                        \
      const at::Tensor& logvar, const at::Tensor& means, const at::Tensor& logvars,             \
      const at::Tensor& logits, const at::Tensor& log_prior_sum, MixtureNeeds needs);

#if defined(CPU_CAPABILITY)
FASTVAE_NAMESPACE_BEGIN
FASTVAE_CPU_MIXTURE_KERNELS
FASTVAE_NAMESPACE_END
#endif
