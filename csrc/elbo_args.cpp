// Validation, accumulation dtype and output allocation of the loss op (see elbo_args.h).
#include "elbo_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace fastvae {
namespace {

constexpr const char* kOp = "fastvae_native::elbo: ";

bool supported_dtype(c10::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

void check_tensor(const char* name, const at::Tensor& tensor, int64_t dims,
                  const at::Device& device) {
  TORCH_CHECK(tensor.dim() == dims && tensor.is_contiguous() && tensor.device() == device &&
                  supported_dtype(tensor.scalar_type()),
              kOp, name, " must be a contiguous ", dims,
              "-D float32, float64, float16 or bfloat16 tensor on ", device, ", got ",
              tensor.sizes(), " ", tensor.scalar_type(), " on ", tensor.device());
}

// Each size of `tensor` must equal `sizes` or, where `broadcast`, be 1.
void check_sizes(const char* name, const at::Tensor& tensor, std::initializer_list<int64_t> sizes,
                 bool broadcast) {
  int64_t dim = 0;
  for (const int64_t size : sizes) {
    const int64_t actual = tensor.size(dim);
    TORCH_CHECK(actual == size || (broadcast && actual == 1), kOp, name, " has size ", actual,
                " in dim ", dim, ", expected ", size, broadcast ? " or 1" : "", " (shape ",
                tensor.sizes(), ")");
    ++dim;
  }
}

void check_decoder(const ElboArgs& a, const at::Device& device) {
  check_tensor("x", *a.x, 2, device);
  check_tensor("x_hat", *a.x_hat, 3, device);
  check_sizes("x_hat", *a.x_hat, {a.samples, a.batch, a.features}, false);
  if (a.x_log_scale) {
    check_tensor("x_log_scale", *a.x_log_scale, 3, device);
    check_sizes("x_log_scale", *a.x_log_scale, {a.samples, a.batch, a.features}, true);
  }
  TORCH_CHECK(a.likelihood >= Likelihood::kGaussian &&
                  static_cast<int64_t>(a.likelihood) < kLikelihoodCount,
              kOp, "unknown likelihood ", static_cast<int64_t>(a.likelihood));
}

// The four latent tensors share mu's dtype; a prior is [1 or B, d] and comes as a pair.
void check_latents(const ElboArgs& a, const at::Device& device) {
  check_tensor("mu", *a.mu, 2, device);
  check_sizes("mu", *a.mu, {a.batch, a.latent}, false);
  TORCH_CHECK((a.prior_mu == nullptr) == (a.prior_logvar == nullptr), kOp,
              "give both prior_mu and prior_logvar or neither");
  const std::pair<const char*, const at::Tensor*> latents[] = {
      {"logvar", a.logvar}, {"prior_mu", a.prior_mu}, {"prior_logvar", a.prior_logvar}};
  for (const auto& [name, tensor] : latents) {
    if (!tensor) continue;
    check_tensor(name, *tensor, 2, device);
    TORCH_CHECK(tensor->scalar_type() == a.mu->scalar_type(), kOp, name, " must have mu's dtype ",
                a.mu->scalar_type(), ", got ", tensor->scalar_type());
  }
  check_sizes("logvar", *a.logvar, {a.batch, a.latent}, false);
  if (a.prior_mu) {
    const int64_t rows = a.prior_mu->size(0);
    TORCH_CHECK((rows == 1 || rows == a.batch) && a.prior_mu->size(1) == a.latent, kOp,
                "prior_mu must be [1 or ", a.batch, ", ", a.latent, "], got ", a.prior_mu->sizes());
    TORCH_CHECK(a.prior_logvar->sizes() == a.prior_mu->sizes(), kOp,
                "prior_mu and prior_logvar must have the same shape");
  }
}

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
  if (a.grad_scale) {
    check_tensor("grad_scale", *a.grad_scale, 1, device);
    check_sizes("grad_scale", *a.grad_scale, {a.batch}, false);
  }
  TORCH_CHECK(a.free_bits >= 0, kOp, "free_bits must be >= 0, got ", a.free_bits);
  TORCH_CHECK(a.reduction >= Reduction::kNone && a.reduction <= Reduction::kSum, kOp,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              static_cast<int64_t>(a.reduction));
  for (int slot = 0; slot < kInputCount; ++slot) {
    TORCH_CHECK(!a.needs_grad[slot] || a.input(static_cast<Input>(slot)), kOp, "needs_grad[",
                slot, "] is set for an absent input");
  }
}

const at::Tensor* optional_pointer(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? &*tensor : nullptr;
}

}  // namespace

const at::Tensor* ElboArgs::input(Input slot) const {
  const std::array<const at::Tensor*, kInputCount> inputs = {
      x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar};
  return inputs[slot];
}

double ElboArgs::uniform_weight() const {
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
  check_decoder(args, device);
  check_latents(args, device);
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

ElboOutputs allocate_elbo_outputs(const ElboArgs& args) {
  const auto options = args.x->options().dtype(args.accumulation);
  const bool per_row = args.reduction == Reduction::kNone;
  ElboOutputs out{per_row ? at::empty({args.batch}, options) : at::empty({}, options),
                  at::empty({args.batch}, options), at::empty({args.batch}, options),
                  at::empty({args.batch}, options)};
  for (int slot = 0; slot < kInputCount; ++slot) {
    const at::Tensor* input = args.input(static_cast<Input>(slot));
    out.grads[slot] = args.needs_grad[slot] ? at::empty_like(*input)
                                            : at::empty({0}, args.x->options());
  }
  if (args.batch == 0) {  // a broadcast input's gradient: a sum over no rows
    for (const Input slot : {kXLogScale, kPriorMu, kPriorLogvar}) {
      if (args.needs_grad[slot]) out.grads[slot].zero_();
    }
  }
  const bool uses_scale =
      with_likelihood(args.likelihood, [](auto nll) { return decltype(nll)::kUsesScale; });
  if (!uses_scale && args.needs_grad[kXLogScale]) out.grads[kXLogScale].zero_();
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
