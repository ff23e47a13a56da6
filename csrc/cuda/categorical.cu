// The categorical likelihood on CUDA, simple and correct (the layouts are those of
// cpu/categorical.cpp). Per position an online log-sum-exp over the K classes (K bounds no
// register or array), the NLL to a per-position buffer, then a second sweep over the same
// logits writing w_b/S·(softmax − onehot). Classes last: a warp per position, its lanes
// striding along the contiguous classes and combining their partial sums by shuffles.
// Class-second: a thread per position, so the threads of a warp read consecutive positions of
// one class row (coalesced). One block per row then sums its positions in a fixed order. No
// atomics: the results are deterministic.
#include <ATen/ops/mean.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <limits>

#include "../categorical_args.h"
#include "../elementwise.h"
#include "elbo.cuh"

namespace fastvae {
namespace cuda {
namespace {

constexpr int kWarp = 32;

template <typename acc_t>
struct Problem {
  Buffer logits, grad;  // grad null: not wanted
  const void* target;
  bool target_bytes;    // uint8, else int64
  RowWeights<acc_t> weights;
  int64_t samples, batch, features, classes;
  acc_t* position_nll;  // [S, B, D]

  // The class index at (b, d); -1 for any outside [0, K).
  __device__ int64_t target_at(int64_t b, int64_t d) const {
    const int64_t index = b * features + d;
    const int64_t t = target_bytes ? static_cast<const uint8_t*>(target)[index]
                                   : static_cast<const int64_t*>(target)[index];
    return t >= 0 && t < classes ? t : -1;
  }

  // Position p = (s·B + b)·D + d, its logits at base + k·stride: its NLL (stored by the
  // thread with first = 0) and the gradient of the classes first, first + step, ...
  __device__ void finish(int64_t p, acc_t log_total, int64_t base, int64_t stride, int64_t first,
                         int64_t step) const {
    const int64_t b = (p / features) % batch;
    const int64_t t = target_at(b, p % features);
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (first == 0) {
      position_nll[p] = t >= 0 ? log_total - load<acc_t>(logits, base + t * stride) : nan;
    }
    if (!grad.data) return;
    const acc_t weight = t >= 0 ? weights(b) / static_cast<acc_t>(samples) : nan;
    for (int64_t k = first; k < classes; k += step) {
      const acc_t logit = load<acc_t>(logits, base + k * stride);
      const acc_t softmax = MathOps<acc_t>::exp(logit - log_total);
      store(grad, base + k * stride, (softmax - acc_t(k == t ? 1 : 0)) * weight);
    }
  }
};

template <typename acc_t>
__global__ void classes_last_kernel(Problem<acc_t> a) {
  const int64_t positions = a.samples * a.batch * a.features;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  // p is the same on every lane of a warp: the shuffles see the whole warp.
  for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
       p < positions; p += warps) {
    const int64_t base = p * a.classes;
    OnlineLogSumExp<acc_t> lanes;
    for (int64_t k = lane; k < a.classes; k += kWarp) lanes.add(load<acc_t>(a.logits, base + k));
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      lanes.merge({__shfl_xor_sync(0xffffffffu, lanes.maximum, offset),
                   __shfl_xor_sync(0xffffffffu, lanes.sum, offset)});
    }
    a.finish(p, lanes.total(), base, 1, lane, kWarp);
  }
}

template <typename acc_t>
__global__ void class_second_kernel(Problem<acc_t> a) {
  const int64_t positions = a.samples * a.batch * a.features;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < positions;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t base = (p / a.features) * a.classes * a.features + p % a.features;
    OnlineLogSumExp<acc_t> running;
    for (int64_t k = 0; k < a.classes; ++k) {
      running.add(load<acc_t>(a.logits, base + k * a.features));
    }
    a.finish(p, running.total(), base, a.features, 0, 1);
  }
}

// nll[b] = Σ over (s, d) of the position NLLs, in a fixed order, over S: a block per row.
template <typename acc_t>
__global__ void rows_kernel(const acc_t* position_nll, int64_t samples, int64_t batch,
                            int64_t features, acc_t* nll) {
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    acc_t sum = 0;
    for (int64_t i = threadIdx.x; i < samples * features; i += blockDim.x) {
      sum += position_nll[((i / features) * batch + b) * features + i % features];
    }
    const acc_t total = block_sum(sum);
    if (threadIdx.x == 0) nll[b] = total / static_cast<acc_t>(samples);
  }
}

template <typename acc_t>
void launch(const CategoricalArgs& args, const CategoricalOutputs& out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t positions = args.samples * args.batch * args.features;
  const at::Tensor position_nll = at::empty({positions}, out.nll.options());
  const Problem<acc_t> problem{
      buffer_of(*args.logits), args.needs_grad ? buffer_of(out.grad_logits) : Buffer{},
      args.target->const_data_ptr(), args.target->scalar_type() == at::kByte,
      RowWeights<acc_t>{optional_buffer(args.grad_scale),
                        static_cast<acc_t>(args.uniform_weight())},
      args.samples, args.batch, args.features, args.classes,
      position_nll.mutable_data_ptr<acc_t>()};
  if (positions > 0 && args.classes_last) {
    const unsigned int blocks = blocks_for(positions, kThreads / kWarp);  // a warp per position
    classes_last_kernel<acc_t><<<blocks, kThreads, 0, stream>>>(problem);
  } else if (positions > 0) {
    class_second_kernel<acc_t><<<blocks_for(positions), kThreads, 0, stream>>>(problem);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (args.batch > 0) {
    rows_kernel<acc_t><<<blocks_for(args.batch, 1), kThreads, 0, stream>>>(
        position_nll.const_data_ptr<acc_t>(), args.samples, args.batch, args.features,
        out.nll.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

CategoricalOutputs categorical_cuda(const CategoricalArgs& args) {
  const c10::cuda::CUDAGuard guard(args.logits->device());
  CategoricalOutputs out = allocate_categorical_outputs(args);
  if (args.accumulation == at::kDouble) {
    launch<double>(args, out);
  } else {
    launch<float>(args, out);
  }
  // An O(B) reduction of the rows; ATen's reductions are deterministic.
  if (args.reduction == Reduction::kNone) {
    out.loss.copy_(out.nll);
  } else if (args.reduction == Reduction::kMean) {
    at::mean_out(out.loss, out.nll, {0});
  } else {
    at::sum_out(out.loss, out.nll, {0});
  }
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("categorical", &fastvae::categorical_op<&fastvae::cuda::categorical_cuda>);
}
