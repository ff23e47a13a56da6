// What the ops' argument handling shares (elbo_args.cpp, iwae_args.cpp): the checks of single
// tensors, of the decoder and latent arguments both ops take, and the allocation of the gradient
// outputs. Every message starts with the op's name (`op`, e.g. "fastvae_native::elbo: ") and
// names the argument.
//
// Like elbo_args.cpp, built once (not per instruction set).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstddef>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "elbo_args.h"
#include "likelihoods.h"

namespace fastvae {

bool supported_dtype(c10::ScalarType type);

// `tensor` must be a contiguous `dims`-D float32, float64, float16 or bfloat16 tensor on `device`.
void check_tensor(const char* op, const char* name, const at::Tensor& tensor, int64_t dims,
                  const at::Device& device);

// Each size of `tensor` must equal `sizes` or, where `broadcast`, be 1.
void check_sizes(const char* op, const char* name, const at::Tensor& tensor,
                 std::initializer_list<int64_t> sizes, bool broadcast);

// grad_scale, when given, holds one floating weight per row.
void check_row_weights(const char* op, const at::Tensor* grad_scale, int64_t batch,
                       const at::Device& device);

void check_reduction(const char* op, Reduction reduction);

const at::Tensor* optional_pointer(const std::optional<at::Tensor>& tensor);

// The sampling op's z for `mu`: the samples stacked along dim 0, [n_samples * B, *rest] for
// [B, *rest] (one sample has mu's shape), [n_samples] for a 0-dim mu (fastvae._common's
// sample_shape).
std::vector<int64_t> sample_shape(const at::Tensor& mu, int64_t n_samples);

// x [B, D], x_hat [S, B, D], θ [Sl, Bl, Dl] (each 1 or full) and a known likelihood; `Args` is
// ElboArgs or IwaeArgs, which name these alike.
template <typename Args>
void check_decoder(const char* op, const Args& a, const at::Device& device) {
  check_tensor(op, "x", *a.x, 2, device);
  check_tensor(op, "x_hat", *a.x_hat, 3, device);
  check_sizes(op, "x_hat", *a.x_hat, {a.samples, a.batch, a.features}, false);
  if (a.x_log_scale) {
    check_tensor(op, "x_log_scale", *a.x_log_scale, 3, device);
    check_sizes(op, "x_log_scale", *a.x_log_scale, {a.samples, a.batch, a.features}, true);
  }
  TORCH_CHECK(a.likelihood >= Likelihood::kGaussian &&
                  static_cast<int64_t>(a.likelihood) < kLikelihoodCount,
              op, "unknown likelihood ", static_cast<int64_t>(a.likelihood));
}

// mu, logvar [B, d]; the prior [1 or B, d], given as a pair or not at all; all in mu's dtype.
template <typename Args>
void check_latents(const char* op, const Args& a, const at::Device& device) {
  check_tensor(op, "mu", *a.mu, 2, device);
  check_sizes(op, "mu", *a.mu, {a.batch, a.latent}, false);
  TORCH_CHECK((a.prior_mu == nullptr) == (a.prior_logvar == nullptr), op,
              "give both prior_mu and prior_logvar or neither");
  const std::pair<const char*, const at::Tensor*> latents[] = {
      {"logvar", a.logvar}, {"prior_mu", a.prior_mu}, {"prior_logvar", a.prior_logvar}};
  for (const auto& [name, tensor] : latents) {
    if (!tensor) continue;
    check_tensor(op, name, *tensor, 2, device);
    TORCH_CHECK(tensor->scalar_type() == a.mu->scalar_type(), op, name, " must have mu's dtype ",
                a.mu->scalar_type(), ", got ", tensor->scalar_type());
  }
  check_sizes(op, "logvar", *a.logvar, {a.batch, a.latent}, false);
  if (a.prior_mu) {
    const int64_t rows = a.prior_mu->size(0);
    TORCH_CHECK((rows == 1 || rows == a.batch) && a.prior_mu->size(1) == a.latent, op,
                "prior_mu must be [1 or ", a.batch, ", ", a.latent, "], got ", a.prior_mu->sizes());
    TORCH_CHECK(a.prior_logvar->sizes() == a.prior_mu->sizes(), op,
                "prior_mu and prior_logvar must have the same shape");
  }
}

// A gradient output: where `needed`, a new tensor shaped like the contiguous `input`, else an
// empty one with `absent`'s options. (at::empty: for a contiguous input the same tensor as
// at::empty_like, without its stride computation: a tenth less host time per output.)
at::Tensor gradient_output(bool needed, const at::Tensor& input, const at::TensorOptions& absent);

// The inputs whose gradients may be sums over the batch (θ and the prior), by slot.
struct BroadcastSlots {
  int log_scale, prior_mu, prior_logvar;
};

// Gradient outputs: slot i like inputs[i] where needs[i], else an empty tensor in x's dtype.
// Those no kernel writes are zeroed here: with an empty batch the broadcast inputs' gradients
// (sums over no rows), and θ's for a likelihood without θ.
template <size_t N>
std::array<at::Tensor, N> allocate_gradients(const std::array<const at::Tensor*, N>& inputs,
                                             const std::array<bool, N>& needs, const at::Tensor& x,
                                             int64_t batch, Likelihood likelihood,
                                             BroadcastSlots broadcast);

}  // namespace fastvae
