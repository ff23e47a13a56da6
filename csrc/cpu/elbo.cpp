// The fused ELBO on the CPU: the NLL pass (nll.cpp) over x, x_hat and x_log_scale, the KL pass
// (kl.cpp) over the latents, then the per-row losses and their reduction.
#include <vector>

#include "huge_pages.h"
#include "kernels.h"
#include "passes.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

// loss = nll + beta * kl_term per row, summed in row order (deterministic) in double, which
// keeps large batches exact enough.
template <typename acc_t>
void reduce_loss(const ElboArgs& args, const ElboOutputs& out, acc_t beta) {
  const acc_t* nll = out.nll.const_data_ptr<acc_t>();
  const acc_t* kl_term = out.kl_term.const_data_ptr<acc_t>();
  acc_t* loss = out.loss.mutable_data_ptr<acc_t>();
  if (args.reduction == Reduction::kNone) {
    for (int64_t b = 0; b < args.batch; ++b) loss[b] = nll[b] + beta * kl_term[b];
    return;
  }
  double total = 0;
  for (int64_t b = 0; b < args.batch; ++b) total += nll[b] + beta * kl_term[b];
  if (args.reduction == Reduction::kMean) total /= static_cast<double>(args.batch);
  *loss = static_cast<acc_t>(total);
}

template <typename acc_t>
void elbo_kernel(const ElboArgs& args, const ElboOutputs& out) {
  const acc_t beta = read_scalar<acc_t>(*args.beta);
  const std::vector<acc_t> weights =
      row_weights<acc_t>(args.grad_scale, args.batch, args.uniform_weight());
  std::vector<acc_t> kl_weights(weights);
  for (acc_t& weight : kl_weights) weight *= beta;
  nll_pass<acc_t>(args, out, weights.data(), out.nll.mutable_data_ptr<acc_t>());
  kl_pass<acc_t>(args, out, kl_weights.data(), out.kl.mutable_data_ptr<acc_t>(),
                 out.kl_term.mutable_data_ptr<acc_t>());
  reduce_loss<acc_t>(args, out, beta);
}

}  // namespace

ElboOutputs elbo_cpu(const ElboArgs& args) {
  ElboOutputs out = allocate_elbo_outputs(args);
  for (const at::Tensor& grad : out.grads) advise_huge_pages(grad);
  with_accumulation(args.accumulation, [&](auto acc) { elbo_kernel<decltype(acc)>(args, out); });
  return out;
}

FASTVAE_NAMESPACE_END
