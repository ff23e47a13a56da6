// Validation, accumulation dtype and output allocation of the loss op (see elbo_args.h).
#include "elbo_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

#include "arg_checks.h"

namespace fastvae {
namespace {

constexpr const char* kOp = "fastvae_native::elbo: ";

// A scalar the kernels read where it lies (beta, capacity): one floating element on the device.
void check_scalar(const char* name, const at::Tensor& tensor, const at::Device& device) {
  TORCH_CHECK(tensor.numel() == 1 && tensor.device() == device &&
                  supported_dtype(tensor.scalar_type()),
              kOp, name, " must be a one-element floating tensor on ", device, ", got ",
              tensor.sizes(), " ", tensor.scalar_type(), " on ", tensor.device());
}

void check_weights(const ElboArgs& a, const at::Device& device) {
  check_scalar("beta", *a.beta, device);
  if (a.capacity) check_scalar("capacity", *a.capacity, device);
  check_row_weights(kOp, a.grad_scale, a.batch, device);
  TORCH_CHECK(a.free_bits >= 0, kOp, "free_bits must be >= 0, got ", a.free_bits);
  check_reduction(kOp, a.reduction);
  for (int slot = 0; slot < kInputCount; ++slot) {
    TORCH_CHECK(!a.needs_grad[slot] || a.input(static_cast<Input>(slot)), kOp, "needs_grad[",
                slot, "] is set for an absent input");
  }
}

}  // namespace

const at::Tensor* ElboArgs::input(Input slot) const {
  const std::array<const at::Tensor*, kInputCount> inputs = {
      x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar};
  return inputs[slot];
}

double ElboArgs::uniform_weight() const { return uniform_row_weight(reduction, batch); }

double uniform_row_weight(Reduction reduction, int64_t batch) {
  return reduction == Reduction::kMean ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1))
                                       : 1.0;
}

c10::ScalarType accumulation_dtype(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* tensor : tensors) {
    if (tensor && tensor->scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void check_elbo_args(const ElboArgs& args) {
  const at::Device device = args.x->device();
  check_decoder(kOp, args, device);
  check_latents(kOp, args, device);
  check_weights(args, device);
}

ElboArgs make_elbo_args(const at::Tensor& x, const at::Tensor& x_hat,
                        const std::optional<at::Tensor>& x_log_scale, const at::Tensor& mu,
                        const at::Tensor& logvar, const std::optional<at::Tensor>& prior_mu,
                        const std::optional<at::Tensor>& prior_logvar, const at::Tensor& beta,
                        const std::optional<at::Tensor>& capacity,
                        const std::optional<at::Tensor>& grad_scale, int64_t likelihood,
                        double x_log_scale_const, double free_bits, int64_t reduction,
                        std::array<bool, kInputCount> needs_grad) {
  TORCH_CHECK(x.dim() == 2 && x_hat.dim() >= 1 && mu.dim() == 2, kOp,
              "expected x [B, D], x_hat [S, B, D] and mu [B, d], got ", x.sizes(), ", ",
              x_hat.sizes(), " and ", mu.sizes());
  ElboArgs args{&x, &x_hat, optional_pointer(x_log_scale), &mu, &logvar,
                optional_pointer(prior_mu), optional_pointer(prior_logvar), &beta,
                optional_pointer(capacity), optional_pointer(grad_scale),
                static_cast<Likelihood>(likelihood), x_log_scale_const, free_bits,
                static_cast<Reduction>(reduction), needs_grad, x_hat.size(0), x.size(0),
                x.size(1), mu.size(1)};
  args.accumulation = accumulation_dtype({&x, &x_hat, args.x_log_scale, &mu});
  check_elbo_args(args);
  return args;
}

DecoderViews decoder_views(const at::Tensor& x_hat, const std::optional<at::Tensor>& x_log_scale) {
  TORCH_CHECK(x_hat.dim() == 2 || x_hat.dim() == 3, kOp,
              "x_hat must be [B, D] or [S, B, D], got ", x_hat.sizes());
  DecoderViews views{x_hat.dim() == 2 ? x_hat.unsqueeze(0) : x_hat, x_log_scale};
  if (x_log_scale) {
    TORCH_CHECK(x_log_scale->dim() <= x_hat.dim(), kOp, "x_log_scale must have at most x_hat's ",
                x_hat.dim(), " dims, got ", x_log_scale->sizes());
    while (views.x_log_scale->dim() < 3) views.x_log_scale = views.x_log_scale->unsqueeze(0);
  }
  return views;
}

void restore_decoder_shapes(ElboOutputs& out, const at::Tensor& x_hat,
                            const std::optional<at::Tensor>& x_log_scale) {
  const std::pair<Input, const at::Tensor*> decoder[] = {
      {kXHat, &x_hat}, {kXLogScale, optional_pointer(x_log_scale)}};
  for (const auto& [slot, given] : decoder) {
    at::Tensor& grad = out.grads[slot];
    // (an unwanted gradient is an empty tensor of its own shape)
    if (given && grad.dim() == 3 && grad.dim() != given->dim()) grad = grad.view(given->sizes());
  }
}

ElboOutputs allocate_elbo_outputs(const ElboArgs& args) {
  const auto options = args.x->options().dtype(args.accumulation);
  const bool per_row = args.reduction == Reduction::kNone;
  ElboOutputs out{per_row ? at::empty({args.batch}, options) : at::empty({}, options),
                  at::empty({args.batch}, options), at::empty({args.batch}, options),
                  at::empty({args.batch}, options)};
  std::array<const at::Tensor*, kInputCount> inputs;
  for (int slot = 0; slot < kInputCount; ++slot) inputs[slot] = args.input(static_cast<Input>(slot));
  out.grads = allocate_gradients(inputs, args.needs_grad, *args.x, args.batch, args.likelihood,
                                 {kXLogScale, kPriorMu, kPriorLogvar});
  return out;
}

void check_scale_args(at::TensorList grads, const at::Tensor& upstream) {
  constexpr const char* kScale = "fastvae_native::scale_: ";
  const at::Device device = upstream.device();
  TORCH_CHECK(upstream.dim() <= 1 && upstream.is_contiguous() &&
                  supported_dtype(upstream.scalar_type()),
              kScale, "upstream must be a 0-dim or [B] floating tensor, got ", upstream.sizes(),
              " ", upstream.scalar_type());
  for (const at::Tensor& grad : grads) {
    TORCH_CHECK(grad.is_contiguous() && grad.device() == device &&
                    supported_dtype(grad.scalar_type()),
                kScale, "every grad must be a contiguous floating tensor on ", device);
    TORCH_CHECK(upstream.dim() == 0 || (grad.dim() == 3 && grad.size(1) == upstream.size(0)),
                kScale, "with a [B] upstream every grad must be [L, ", upstream.numel(),
                ", T], got ", grad.sizes());
  }
}

ElboTuple ElboOutputs::as_tuple() const {
  return {loss, nll, kl, kl_term, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5],
          grads[6]};
}

}  // namespace fastvae
