// The loss op's arguments as one structure, with the validation, the accumulation dtype and the
// output allocation that the CPU and CUDA implementations share, so that both accept exactly the
// same calls. The op's argument list is written out in C++ only here (elbo_op) and in the
// schema (registration.cpp).
//
// Nothing here is compiled per instruction set: the functions are defined in elbo_args.cpp,
// which is built once, so no AVX-512 copy of them can be picked on an AVX2 machine.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "likelihoods.h"

namespace fastvae {

// Mirrors fastvae._common.Reduction; the op takes the value as an int.
enum class Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// The differentiable inputs in op order: op input i has gradient slot i (fastvae._common.INPUTS).
enum Input : int { kX, kXHat, kXLogScale, kMu, kLogvar, kPriorMu, kPriorLogvar, kInputCount };

// The kernels' view of one call. Tensors are borrowed from the caller for the call's duration;
// an optional one is null when absent. All tensors are contiguous and on x's device.
struct ElboArgs {
  const at::Tensor* x;             // [B, D] the data
  const at::Tensor* x_hat;         // [S, B, D] the decoder output: mean, logits or location
                                  // (the op's [B, D] one is viewed as [1, B, D])
  const at::Tensor* x_log_scale;   // θ as [Sl, Bl, Dl], each 1 or S, B, D; null: the constant
                                  // (the op's θ of fewer dims is viewed so)
  const at::Tensor* mu;            // [B, d] the encoder mean
  const at::Tensor* logvar;        // [B, d] the encoder log-variance, in mu's dtype
  const at::Tensor* prior_mu;      // [Bp, d] with Bp 1 or B, mu's dtype; null: N(0, I)
  const at::Tensor* prior_logvar;  // prior_mu's shape and dtype; null exactly when prior_mu is
  const at::Tensor* beta;          // one element: the KL weight, read where it lies (no sync)
  // One element: the KL capacity C (Burgess et al. 2018), read where it lies; null: none. With
  // it, kl_term[b] = |KL_fb[b] - C| and row b's latent gradients take sign(KL_fb[b] - C).
  const at::Tensor* capacity;
  const at::Tensor* grad_scale;    // [B] weights w_b of the rows in the gradient; null: uniform
  Likelihood likelihood;           // which per-element NLL (likelihoods.h)
  double x_log_scale_const;        // θ everywhere when x_log_scale is null
  double free_bits;                // ≥ 0: a latent dim whose batch-mean KL is below it counts it
  Reduction reduction;             // of the per-row losses into `loss`
  std::array<bool, kInputCount> needs_grad;  // per slot: whether to form that gradient
  // Derived from the shapes.
  int64_t samples, batch, features, latent;  // S, B, D, d
  c10::ScalarType accumulation;    // the dtype of the sums and of loss, nll, kl, kl_term

  const at::Tensor* input(Input slot) const;
  // The weight every row has in the gradient when grad_scale is null.
  double uniform_weight() const;
};

using ElboTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// loss ([B] for Reduction::kNone, else 0-dim), nll, kl, kl_term ([B]) in the accumulation
// dtype; grads[i] like input i where needs_grad[i], else an empty tensor in x's dtype.
struct ElboOutputs {
  at::Tensor loss, nll, kl, kl_term;
  std::array<at::Tensor, kInputCount> grads;
  ElboTuple as_tuple() const;
};

// The weight w_b of every row in the gradient when no grad_scale is given: 1/B for the mean
// (1 for an empty batch), else 1.
double uniform_row_weight(Reduction reduction, int64_t batch);

// float64 when any given tensor (null ones skipped) is float64, else float32: the one rule.
c10::ScalarType accumulation_dtype(std::initializer_list<const at::Tensor*> tensors);

// Calls visit(acc_t{}), acc_t double for a float64 accumulation dtype, else float: the kernels
// are templates over the type of their sums.
template <typename Visit>
void with_accumulation(c10::ScalarType accumulation, Visit&& visit) {
  if (accumulation == c10::ScalarType::Double) {
    visit(double{});
  } else {
    visit(float{});
  }
}

// Throws with a message naming the argument unless `args` describes a call the kernels accept.
void check_elbo_args(const ElboArgs& args);

// The op's arguments as an ElboArgs, checked.
ElboArgs make_elbo_args(const at::Tensor& x, const at::Tensor& x_hat,
                        const std::optional<at::Tensor>& x_log_scale, const at::Tensor& mu,
                        const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                        const std::optional<at::Tensor>& prior_logvar, const at::Tensor& beta,
                        const std::optional<at::Tensor>& capacity,
                        const std::optional<at::Tensor>& grad_scale, int64_t likelihood,
                        double x_log_scale_const, double free_bits, int64_t reduction,
                        std::array<bool, kInputCount> needs_grad);

// Fresh outputs for `args`. A gradient that is a sum over an empty batch is zeroed here.
ElboOutputs allocate_elbo_outputs(const ElboArgs& args);

// Throws unless scale_(grads, upstream) is a call the kernels accept: upstream 0-dim or [B]
// (then every grad [L, B, T]), all contiguous, floating and on upstream's device.
void check_scale_args(at::TensorList grads, const at::Tensor& upstream);

// The op takes x_hat as [B, D] (one sample, x's shape) or [S, B, D], and θ with at most
// x_hat's dims, broadcasting to it right-aligned (each size 1 or full), so that a caller needs
// no view, which would cost an autograd node each way. The kernels see both as 3-D: these are
// those views (x_hat [S, B, D], θ [Sl, Bl, Dl]), borrowed from the op's arguments.
struct DecoderViews {
  at::Tensor x_hat;
  std::optional<at::Tensor> x_log_scale;
};
DecoderViews decoder_views(const at::Tensor& x_hat, const std::optional<at::Tensor>& x_log_scale);

// The gradients of x_hat and θ back in the shapes the op was given.
void restore_decoder_shapes(ElboOutputs& out, const at::Tensor& x_hat,
                            const std::optional<at::Tensor>& x_log_scale);

// The op as registered for one device: `Impl` receives the checked arguments.
template <ElboOutputs (*Impl)(const ElboArgs&)>
ElboTuple elbo_op(const at::Tensor& x, const at::Tensor& x_hat,
                  const std::optional<at::Tensor>& x_log_scale, const at::Tensor& mu,
                  const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                  const std::optional<at::Tensor>& prior_logvar, const at::Tensor& beta,
                  const std::optional<at::Tensor>& capacity,
                  const std::optional<at::Tensor>& grad_scale, int64_t likelihood,
                  double x_log_scale_const, double free_bits, int64_t reduction,
                  std::array<bool, kInputCount> needs_grad) {
  const DecoderViews decoder = decoder_views(x_hat, x_log_scale);
  ElboOutputs out = Impl(make_elbo_args(x, decoder.x_hat, decoder.x_log_scale, mu, logvar,
                                        prior_mu, prior_logvar, beta, capacity, grad_scale,
                                        likelihood, x_log_scale_const, free_bits, reduction,
                                        needs_grad));
  restore_decoder_shapes(out, x_hat, x_log_scale);
  return out.as_tuple();
}

// The op's C++ signature, for typed calls through the dispatcher (the template argument, a
// device's implementation, does not change it).
using ElboSignature = decltype(elbo_op<nullptr>);

}  // namespace fastvae
