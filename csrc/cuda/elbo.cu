// The fused ELBO on CUDA: the NLL pass (nll.cu), the KL pass (kl.cu), then the per-row losses
// and their reduction by one block in a fixed order.
#include <torch/library.h>

#include "elbo.cuh"

namespace fastvae {
namespace cuda {
namespace {

// loss = nll + beta * kl_term per row, then reduced by one block in a fixed order.
template <typename acc_t>
__global__ void loss_kernel(const acc_t* nll, const acc_t* kl_term, Buffer beta, int64_t batch,
                            Reduction reduction, acc_t* loss) {
  const acc_t beta_value = load<acc_t>(beta, 0);
  const bool per_row = reduction == Reduction::kNone;
  acc_t sum = 0;
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    const acc_t row = nll[b] + beta_value * kl_term[b];
    if (per_row) {
      loss[b] = row;
    } else {
      sum += row;
    }
  }
  if (per_row) return;
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) loss[0] = reduction == Reduction::kMean ? total / static_cast<acc_t>(batch) : total;
}

template <typename acc_t>
void launch(const ElboArgs& args, const ElboOutputs& out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const RowWeights<acc_t> weights{optional_buffer(args.grad_scale),
                                  static_cast<acc_t>(args.uniform_weight())};
  launch_nll<acc_t>(args, out, weights, stream);
  launch_kl<acc_t>(args, out, weights, stream);
  loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(
      out.nll.const_data_ptr<acc_t>(), out.kl_term.const_data_ptr<acc_t>(), buffer_of(*args.beta),
      args.batch, args.reduction, out.loss.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

ElboOutputs elbo_cuda(const ElboArgs& args) {
  const c10::cuda::CUDAGuard guard(args.x->device());
  ElboOutputs out = allocate_elbo_outputs(args);
  with_accumulation(args.accumulation, [&](auto acc) { launch<decltype(acc)>(args, out); });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("elbo", &fastvae::elbo_op<&fastvae::cuda::elbo_cuda>);
}
