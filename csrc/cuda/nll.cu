// The NLL pass of the ELBO on CUDA. One block per datapoint row computes the NLL row sum and
// writes the per-element gradients (nll.cuh's nll_columns), kVec elements per thread with 16-byte
// accesses where the rows allow; the θ gradients summed across rows follow (launch_scale_sums).
#include "nll.cuh"

namespace fastvae {
namespace cuda {
namespace {

template <typename Nll, int kVec, typename acc_t>
__global__ void nll_rows_kernel(NllArgs<acc_t> a, acc_t* nll_rows) {
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    acc_t nll_sum = 0;
    for (int64_t j = threadIdx.x * int64_t(kVec); j < a.features; j += int64_t(blockDim.x) * kVec) {
      nll_sum += nll_columns<Nll, kVec>(a, b, j);
    }
    const acc_t total = block_sum(nll_sum);
    if (threadIdx.x == 0) nll_rows[b] = total / static_cast<acc_t>(a.samples);
  }
}

template <typename Nll, typename acc_t>
void launch_likelihood(const NllArgs<acc_t>& a, const at::Tensor& nll, cudaStream_t stream) {
  if (a.batch > 0) {
    const unsigned int blocks = blocks_for(a.batch, 1);
    if (rows_aligned(a)) {
      nll_rows_kernel<Nll, kVec><<<blocks, kThreads, 0, stream>>>(a, nll.mutable_data_ptr<acc_t>());
    } else {
      nll_rows_kernel<Nll, 1><<<blocks, kThreads, 0, stream>>>(a, nll.mutable_data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (a.grad_x_log_scale.data) launch_scale_sums<Nll>(a, nll.options(), stream);
}

}  // namespace

template <typename acc_t>
void launch_nll(const ElboArgs& args, const ElboOutputs& out, RowWeights<acc_t> weights,
                cudaStream_t stream) {
  const NllArgs<acc_t> a = nll_args(args, out, weights);
  with_likelihood(args.likelihood, [&](auto likelihood) {
    launch_likelihood<decltype(likelihood)>(a, out.nll, stream);
  });
}

template void launch_nll<float>(const ElboArgs&, const ElboOutputs&, RowWeights<float>, cudaStream_t);
template void launch_nll<double>(const ElboArgs&, const ElboOutputs&, RowWeights<double>, cudaStream_t);

}  // namespace cuda
}  // namespace fastvae
