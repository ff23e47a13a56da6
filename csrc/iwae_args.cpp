// Validation and output allocation of the importance-weighted bound op (see iwae_args.h).
#include "iwae_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "arg_checks.h"

namespace fastvae {
namespace {

constexpr const char* kOp = "fastvae_native::iwae: ";

// z [S, B, d] in the latents' dtype; the latents themselves as in elbo.
void check_samples(const IwaeArgs& a, const at::Device& device) {
  TORCH_CHECK(a.samples >= 1, kOp, "x_hat must hold at least one sample, got ", a.x_hat->sizes());
  check_tensor(kOp, "z", *a.z, 3, device);
  check_sizes(kOp, "z", *a.z, {a.samples, a.batch, a.latent}, false);
  check_latents(kOp, a, device);
  TORCH_CHECK(a.z->scalar_type() == a.mu->scalar_type(), kOp, "z must have mu's dtype ",
              a.mu->scalar_type(), ", got ", a.z->scalar_type());
}

void check_weights(const IwaeArgs& a, const at::Device& device) {
  if (a.log_weight_offset) {
    check_tensor(kOp, "log_weight_offset", *a.log_weight_offset, 2, device);
    check_sizes(kOp, "log_weight_offset", *a.log_weight_offset, {a.samples, a.batch}, false);
  }
  check_row_weights(kOp, a.grad_scale, a.batch, device);
  check_reduction(kOp, a.reduction);
  for (int slot = 0; slot < IwaeSlot::kCount; ++slot) {
    TORCH_CHECK(!a.needs_grad[slot] || a.input(slot), kOp, "needs_grad[", slot,
                "] is set for an absent input");
  }
}

}  // namespace

const at::Tensor* IwaeArgs::input(int slot) const {
  const std::array<const at::Tensor*, IwaeSlot::kCount> inputs = {
      x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset};
  return inputs[slot];
}

double IwaeArgs::uniform_weight() const { return uniform_row_weight(reduction, batch); }

void check_iwae_args(const IwaeArgs& args) {
  const at::Device device = args.x->device();
  check_decoder(kOp, args, device);
  check_samples(args, device);
  check_weights(args, device);
}

IwaeArgs make_iwae_args(const at::Tensor& x, const at::Tensor& x_hat,
                        const std::optional<at::Tensor>& x_log_scale, const at::Tensor& z,
                        const at::Tensor& mu, const at::Tensor& logvar,
                        const std::optional<at::Tensor>& prior_mu,
                        const std::optional<at::Tensor>& prior_logvar,
                        const std::optional<at::Tensor>& log_weight_offset,
                        const std::optional<at::Tensor>& grad_scale, int64_t likelihood,
                        double x_log_scale_const, int64_t reduction, bool dreg,
                        std::array<bool, IwaeSlot::kCount> needs_grad) {
  TORCH_CHECK(x.dim() == 2 && x_hat.dim() >= 1 && mu.dim() == 2, kOp,
              "expected x [B, D], x_hat [S, B, D] and mu [B, d], got ", x.sizes(), ", ",
              x_hat.sizes(), " and ", mu.sizes());
  IwaeArgs args{&x, &x_hat, optional_pointer(x_log_scale), &z, &mu, &logvar,
                optional_pointer(prior_mu), optional_pointer(prior_logvar),
                optional_pointer(log_weight_offset), optional_pointer(grad_scale),
                static_cast<Likelihood>(likelihood), x_log_scale_const,
                static_cast<Reduction>(reduction), dreg, needs_grad,
                x_hat.size(0), x.size(0), x.size(1), mu.size(1)};
  args.accumulation = accumulation_dtype({&x, &x_hat, args.x_log_scale, &z});
  check_iwae_args(args);
  return args;
}

IwaeOutputs allocate_iwae_outputs(const IwaeArgs& args) {
  const auto options = args.x->options().dtype(args.accumulation);
  IwaeOutputs out{args.reduction == Reduction::kNone ? at::empty({args.batch}, options)
                                                     : at::empty({}, options),
                  at::empty({args.samples, args.batch}, options)};
  std::array<const at::Tensor*, IwaeSlot::kCount> inputs;
  for (int slot = 0; slot < IwaeSlot::kCount; ++slot) inputs[slot] = args.input(slot);
  out.grads = allocate_gradients(inputs, args.needs_grad, *args.x, args.batch, args.likelihood,
                                 {IwaeSlot::kXLogScale, IwaeSlot::kPriorMu,
                                  IwaeSlot::kPriorLogvar});
  return out;
}

IwaeTuple IwaeOutputs::as_tuple() const {
  return {loss,     log_weights, grads[0], grads[1], grads[2], grads[3],
          grads[4], grads[5],    grads[6], grads[7], grads[8]};
}

}  // namespace fastvae
