// Registers the CPU kernels, choosing at load time between the AVX2 and AVX-512 builds the way
// ATen chooses its own (at::get_cpu_capability, which honours ATEN_CPU_CAPABILITY).
#include <ATen/Version.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "kernels.h"
#include "mixture.h"

namespace fastvae::AVX2 {
FASTVAE_CPU_KERNELS
FASTVAE_CPU_MIXTURE_KERNELS
}  // namespace fastvae::AVX2
namespace fastvae::AVX512 {
FASTVAE_CPU_KERNELS
FASTVAE_CPU_MIXTURE_KERNELS
}  // namespace fastvae::AVX512

namespace {

bool use_avx512() {
  static const bool avx512 = [] {
    if (at::get_cpu_capability() == "AVX512") return true;
    TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"),
                "fastvae's CPU kernels need a CPU with AVX2 and FMA");
    return false;
  }();
  return avx512;
}

at::Tensor reparameterize(const at::Tensor& mu, const at::Tensor& logvar, const at::Tensor& seed,
                          int64_t n_samples) {
  return use_avx512() ? fastvae::AVX512::reparameterize_cpu(mu, logvar, seed, n_samples)
                      : fastvae::AVX2::reparameterize_cpu(mu, logvar, seed, n_samples);
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward(
    const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed, int64_t n_samples,
    bool need_mu, bool need_logvar) {
  return use_avx512() ? fastvae::AVX512::reparameterize_backward_cpu(grad_z, logvar, seed, n_samples,
                                                                      need_mu, need_logvar)
                      : fastvae::AVX2::reparameterize_backward_cpu(grad_z, logvar, seed, n_samples,
                                                                    need_mu, need_logvar);
}

fastvae::ElboOutputs elbo(const fastvae::ElboArgs& args) {
  return use_avx512() ? fastvae::AVX512::elbo_cpu(args) : fastvae::AVX2::elbo_cpu(args);
}

fastvae::IwaeOutputs iwae(const fastvae::IwaeArgs& args) {
  return use_avx512() ? fastvae::AVX512::iwae_cpu(args) : fastvae::AVX2::iwae_cpu(args);
}

fastvae::CategoricalOutputs categorical(const fastvae::CategoricalArgs& args) {
  return use_avx512() ? fastvae::AVX512::categorical_cpu(args)
                      : fastvae::AVX2::categorical_cpu(args);
}

void scale_(at::TensorList grads, const at::Tensor& upstream) {
  return use_avx512() ? fastvae::AVX512::scale_cpu(grads, upstream)
                      : fastvae::AVX2::scale_cpu(grads, upstream);
}

at::Tensor philox_normals(const at::Tensor& seed, int64_t first_call, int64_t count) {
  return use_avx512() ? fastvae::AVX512::philox_normals_cpu(seed, first_call, count)
                      : fastvae::AVX2::philox_normals_cpu(seed, first_call, count);
}

int64_t parallel_threads() {
  return use_avx512() ? fastvae::AVX512::parallel_threads_cpu()
                      : fastvae::AVX2::parallel_threads_cpu();
}

fastvae::MixtureForward mixture_log_ratio(const at::Tensor& z, const at::Tensor& mu,
                                          const at::Tensor& logvar, const at::Tensor& means,
                                          const at::Tensor& logvars, const at::Tensor& logits) {
  return use_avx512()
             ? fastvae::AVX512::mixture_log_ratio_cpu(z, mu, logvar, means, logvars, logits)
             : fastvae::AVX2::mixture_log_ratio_cpu(z, mu, logvar, means, logvars, logits);
}

fastvae::MixtureGrads mixture_log_ratio_backward(
    const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu, const at::Tensor& logvar,
    const at::Tensor& means, const at::Tensor& logvars, const at::Tensor& logits,
    const at::Tensor& log_prior_sum, fastvae::MixtureNeeds needs) {
  return use_avx512() ? fastvae::AVX512::mixture_log_ratio_backward_cpu(
                            grad, z, mu, logvar, means, logvars, logits, log_prior_sum, needs)
                      : fastvae::AVX2::mixture_log_ratio_backward_cpu(
                            grad, z, mu, logvar, means, logvars, logits, log_prior_sum, needs);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvae_native, CPU, m) {
  m.impl("reparameterize", &reparameterize);
  m.impl("reparameterize_backward", &reparameterize_backward);
  m.impl("elbo", &fastvae::elbo_op<&elbo>);
  m.impl("iwae", &fastvae::iwae_op<&iwae>);
  m.impl("scale_", &scale_);
  m.impl("categorical", &fastvae::categorical_op<&categorical>);
  m.impl("_philox_normals", &philox_normals);
  m.impl("mixture_log_ratio", &mixture_log_ratio);
  m.impl("mixture_log_ratio_backward", &mixture_log_ratio_backward);
}

// An op without tensor arguments has no device to dispatch on: CompositeExplicitAutograd is the
// kernel the dispatcher falls back to for it.
TORCH_LIBRARY_IMPL(fastvae_native, CompositeExplicitAutograd, m) {
  m.impl("_parallel_threads", &parallel_threads);
}
