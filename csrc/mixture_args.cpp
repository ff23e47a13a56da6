// Checks, component tables and gradient assembly of the mixture log-ratio ops (see
// mixture_args.h).
#include "mixture_args.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>

#include <limits>

#include "arg_checks.h"

namespace fastvae {
namespace {

constexpr const char* kForward = "fastvae_native::mixture_log_ratio: ";
constexpr const char* kBackward = "fastvae_native::mixture_log_ratio_backward: ";

void check_input(const char* op, const char* name, const at::Tensor& tensor,
                 std::initializer_list<int64_t> sizes, const at::Tensor& z) {
  TORCH_CHECK(tensor.sizes() == at::IntArrayRef(sizes), op, name, " must be ",
              at::IntArrayRef(sizes), ", got ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == z.scalar_type(), op, name, " must have z's dtype ",
              z.scalar_type(), ", got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device() == z.device(), op, name, " must be on z's device ", z.device(),
              ", got ", tensor.device());
  TORCH_CHECK(tensor.is_contiguous(), op, name, " must be contiguous");
}

// `op` (kForward or kBackward) prefixes the error messages.
MixtureArgs make_mixture_args(const char* op, const at::Tensor& z, const at::Tensor& mu,
                              const at::Tensor& logvar, const at::Tensor& means,
                              const at::Tensor& logvars, const at::Tensor& logits) {
  TORCH_CHECK(z.dim() == 3 && means.dim() == 2, op, "expected z [S, B, d] and means [K, d], got ",
              z.sizes(), " and ", means.sizes());
  const auto type = z.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf ||
                  type == at::kBFloat16,
              op, "z must be float32, float64, float16 or bfloat16, got ", type);
  const MixtureArgs args{&z, &mu, &logvar, &means, &logvars, &logits, z.size(0), z.size(1),
                         z.size(2), means.size(0),
                         type == at::kDouble ? at::kDouble : at::kFloat};
  TORCH_CHECK(args.components >= 1, op, "the mixture needs K >= 1 components, got means ",
              means.sizes());
  check_input(op, "z", z, {args.samples, args.batch, args.latent}, z);
  check_input(op, "mu", mu, {args.batch, args.latent}, z);
  check_input(op, "logvar", logvar, {args.batch, args.latent}, z);
  check_input(op, "means", means, {args.components, args.latent}, z);
  check_input(op, "logvars", logvars, {args.components, args.latent}, z);
  check_input(op, "logits", logits, {args.components}, z);
  return args;
}

// grad and log_prior_sum, checked ([S, B] floating on z's device), in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> backward_inputs(const MixtureArgs& args, const at::Tensor& grad,
                                                 const at::Tensor& log_prior_sum) {
  const std::pair<const char*, const at::Tensor*> rows[] = {{"grad", &grad},
                                                            {"log_prior_sum", &log_prior_sum}};
  for (const auto& [name, tensor] : rows) {
    TORCH_CHECK(tensor->sizes() == at::IntArrayRef({args.samples, args.batch}) &&
                    at::isFloatingType(tensor->scalar_type()) &&
                    tensor->device() == args.z->device(),
                kBackward, name, " must be a floating [",
                args.samples, ", ", args.batch, "] tensor on ", args.z->device(), ", got ",
                tensor->sizes(), " ", tensor->scalar_type(), " on ", tensor->device());
  }
  return {grad.to(args.accumulation).contiguous(),
          log_prior_sum.to(args.accumulation).contiguous()};
}

MixtureComponents mixture_components(const MixtureArgs& args) {
  const int64_t padded =
      (args.components + kComponentAlign - 1) / kComponentAlign * kComponentAlign;
  const int64_t pad = padded - args.components;
  const at::Tensor means = args.means->to(args.accumulation);
  const at::Tensor logvars = args.logvars->to(args.accumulation);
  const at::Tensor logits = args.logits->to(args.accumulation);
  const at::Tensor inv_var = at::exp(-logvars);
  // Padding appended along K: zeros for the tables, −inf for the offsets.
  const auto transposed = [&](const at::Tensor& table) {
    return at::constant_pad_nd(table.t(), {0, pad}, 0.0).contiguous();
  };
  const at::Tensor offsets = at::constant_pad_nd(logits - 0.5 * logvars.sum(1), {0, pad},
                                                 -std::numeric_limits<double>::infinity());
  return {padded,     transposed(means), transposed(inv_var), means.contiguous(),
          inv_var,    offsets,           at::logsumexp(logits, 0), at::softmax(logits, 0)};
}

// Input i's shape and dtype where needed, else empty; sums over no samples (mu's and logvar's
// with S = 0) are zeroed.
std::array<at::Tensor, 6> allocate_mixture_grads(const MixtureArgs& args,
                                                 const MixtureNeeds& needs) {
  const std::array<const at::Tensor*, 6> inputs = {args.z,     args.mu,      args.logvar,
                                                   args.means, args.logvars, args.logits};
  std::array<at::Tensor, 6> grads;
  for (size_t i = 0; i < inputs.size(); ++i) {
    grads[i] = gradient_output(needs[i], *inputs[i], args.z->options());
  }
  if (args.samples == 0) {
    for (const int i : {1, 2}) grads[i].zero_();
  }
  return grads;
}

}  // namespace

MixtureForward mixture_forward(const at::Tensor& z, const at::Tensor& mu,
                               const at::Tensor& logvar, const at::Tensor& means,
                               const at::Tensor& logvars, const at::Tensor& logits,
                               const std::array<MixtureForwardKernel, 2>& kernels) {
  const MixtureArgs args = make_mixture_args(kForward, z, mu, logvar, means, logvars, logits);
  const c10::DeviceGuard guard(z.device());
  const MixtureComponents components = mixture_components(args);
  const auto options = z.options().dtype(args.accumulation);
  at::Tensor log_ratio = at::empty({args.samples, args.batch}, options);
  at::Tensor log_prior_sum = at::empty({args.samples, args.batch}, options);
  kernels[args.accumulation == at::kDouble](args, components, log_ratio, log_prior_sum);
  return {log_ratio, log_prior_sum};
}

MixtureGrads mixture_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu,
                              const at::Tensor& logvar, const at::Tensor& means,
                              const at::Tensor& logvars, const at::Tensor& logits,
                              const at::Tensor& log_prior_sum, const MixtureNeeds& needs,
                              const std::array<MixtureBackwardKernel, 2>& kernels) {
  const MixtureArgs args = make_mixture_args(kBackward, z, mu, logvar, means, logvars, logits);
  const c10::DeviceGuard guard(z.device());
  const auto [grad_rows, log_prior_rows] = backward_inputs(args, grad, log_prior_sum);
  std::array<at::Tensor, 6> grads = allocate_mixture_grads(args, needs);
  kernels[args.accumulation == at::kDouble](args, mixture_components(args), grad_rows,
                                            log_prior_rows, needs, grads);
  return {grads[0], grads[1], grads[2], grads[3], grads[4], grads[5]};
}

void store_component_grads(const MixtureArgs& args, const MixtureComponents& components,
                           const at::Tensor& totals, std::array<at::Tensor, 6>& grads) {
  const int64_t table = args.latent * components.padded;
  for (int64_t slot : {3, 4}) {
    if (grads[slot].numel() == 0) continue;
    const at::Tensor sums = totals.narrow(0, (slot - 3) * table, table)
                                .view({args.latent, components.padded})
                                .narrow(1, 0, args.components);
    grads[slot].copy_(sums.t());
  }
  if (grads[5].numel() == 0) return;
  // −Σ g·(r_k − π_k) = (−Σ g·r_k) + π_k·Σ g.
  const at::Tensor responsibility = totals.narrow(0, 2 * table, args.components);
  grads[5].copy_(responsibility + components.weights * totals[-1]);
}

}  // namespace fastvae
