// The importance-weighted bound op's arguments as one structure, with the validation and the
// output allocation that its CPU and CUDA implementations share (the counterpart of elbo_args.h;
// the checks both ops make are in arg_checks.h). The op's argument list is written out in C++
// only here (iwae_op) and in the schema (registration.cpp).
//
// Nothing here is compiled per instruction set (iwae_args.cpp is built once).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "elbo_args.h"
#include "likelihoods.h"

namespace fastvae {

// The differentiable inputs of iwae in op order: op input i has gradient slot i
// (fastvae._common.IWAE_INPUTS). The first three are elbo's.
struct IwaeSlot {
  enum : int {
    kX, kXHat, kXLogScale, kZ, kMu, kLogvar, kPriorMu, kPriorLogvar, kLogWeightOffset, kCount };
};

// The kernels' view of one call. Tensors are borrowed from the caller for the call's duration;
// an optional one is null when absent. All tensors are contiguous and on x's device.
struct IwaeArgs {
  const at::Tensor* x;                  // [B, D] the data
  const at::Tensor* x_hat;              // [S, B, D] the decoder output of each sample, S >= 1
  const at::Tensor* x_log_scale;        // θ as [Sl, Bl, Dl], each 1 or S, B, D; null: the constant
  const at::Tensor* z;                  // [S, B, d] the samples the decoder saw, in mu's dtype
  const at::Tensor* mu;                 // [B, d] the encoder mean
  const at::Tensor* logvar;             // [B, d] the encoder log-variance, in mu's dtype
  const at::Tensor* prior_mu;           // [Bp, d] with Bp 1 or B, mu's dtype; null: N(0, I)
  const at::Tensor* prior_logvar;       // prior_mu's shape and dtype; null exactly when prior_mu is
  const at::Tensor* log_weight_offset;  // [S, B] added to the log weights; null: zero
  const at::Tensor* grad_scale;         // [B] weights ω_b of the rows in the gradient; null: uniform
  Likelihood likelihood;                // which per-element NLL (likelihoods.h)
  double x_log_scale_const;             // θ everywhere when x_log_scale is null
  Reduction reduction;                  // of the per-row losses into `loss`
  bool dreg;  // z's gradient weighs sample s by ω_b·w̃² (doubly reparameterised), not ω_b·w̃
  std::array<bool, IwaeSlot::kCount> needs_grad;  // per slot: whether to form that gradient
  // Derived from the shapes.
  int64_t samples, batch, features, latent;  // S, B, D, d
  c10::ScalarType accumulation;  // the dtype of the sums and of loss and log_weights

  const at::Tensor* input(int slot) const;
  // The weight every row has in the gradient when grad_scale is null.
  double uniform_weight() const;
};

using IwaeTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                             at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// loss ([B] for Reduction::kNone, else 0-dim) and log_weights [S, B] in the accumulation dtype;
// grads[i] like input i where needs_grad[i], else an empty tensor in x's dtype.
struct IwaeOutputs {
  at::Tensor loss, log_weights;
  std::array<at::Tensor, IwaeSlot::kCount> grads;
  IwaeTuple as_tuple() const;
};

// Throws with a message naming the argument unless `args` describes a call the kernels accept.
void check_iwae_args(const IwaeArgs& args);

// The op's arguments as an IwaeArgs, checked.
IwaeArgs make_iwae_args(const at::Tensor& x, const at::Tensor& x_hat,
                        const std::optional<at::Tensor>& x_log_scale, const at::Tensor& z,
                        const at::Tensor& mu, const at::Tensor& logvar,
                        const std::optional<at::Tensor>& prior_mu,
                        const std::optional<at::Tensor>& prior_logvar,
                        const std::optional<at::Tensor>& log_weight_offset,
                        const std::optional<at::Tensor>& grad_scale, int64_t likelihood,
                        double x_log_scale_const, int64_t reduction, bool dreg,
                        std::array<bool, IwaeSlot::kCount> needs_grad);

// Fresh outputs for `args`. A gradient that is a sum over an empty batch is zeroed here.
IwaeOutputs allocate_iwae_outputs(const IwaeArgs& args);

// The op as registered for one device: `Impl` receives the checked arguments.
template <IwaeOutputs (*Impl)(const IwaeArgs&)>
IwaeTuple iwae_op(const at::Tensor& x, const at::Tensor& x_hat,
                  const std::optional<at::Tensor>& x_log_scale, const at::Tensor& z,
                  const at::Tensor& mu, const at::Tensor& logvar,
                  const std::optional<at::Tensor>& prior_mu,
                  const std::optional<at::Tensor>& prior_logvar,
                  const std::optional<at::Tensor>& log_weight_offset,
                  const std::optional<at::Tensor>& grad_scale, int64_t likelihood,
                  double x_log_scale_const, int64_t reduction, bool dreg,
                  std::array<bool, IwaeSlot::kCount> needs_grad) {
  return Impl(make_iwae_args(x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar,
                             log_weight_offset, grad_scale, likelihood, x_log_scale_const,
                             reduction, dreg, needs_grad))
      .as_tuple();
}

}  // namespace fastvae
