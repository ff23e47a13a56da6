// scale_ on CUDA: every gradient element g becomes g·u (u the upstream gradient), in float32
// (float64 for float64 g) and rounded once to g's dtype.
// One launch covers up to kMaxTargets gradients. u is read on the device: with a 0-dim u every
// block returns at once where u == 1, and with a [B] u a tile of a row whose u == 1 is skipped.
// No host sync and no allocation, so the launch can be captured in a CUDA graph.
#include <torch/library.h>

#include "../elbo_args.h"
#include "common.cuh"

namespace fastvae {
namespace cuda {
namespace {

constexpr int kMaxTargets = 8;
constexpr int64_t kTileElements = int64_t(kThreads) * kVec;
// Enough blocks to fill a large GPU; more would only add early exits.
constexpr int64_t kMaxBlocks = 1024;

// One gradient viewed as `rows` rows of `length`; its tiles are numbered from first_tile.
struct ScaleTarget {
  Buffer grad;
  int64_t rows, length, tiles_per_row, first_tile;
  int64_t batch;    // rows per factor cycle: B with a [B] upstream, else 1
  bool vectorized;  // rows start 16-byte aligned and hold whole kVec groups
};

struct ScaleLaunch {
  Buffer upstream;
  int count;
  int64_t tiles;
  ScaleTarget targets[kMaxTargets];
};

template <typename acc_t>
__device__ void scale_tile(const ScaleLaunch& s, const ScaleTarget& t, int64_t row, int64_t segment) {
  // Tested in acc_t, the type the product is formed in: a factor that rounds to 1 leaves g as is.
  const acc_t factor = load<acc_t>(s.upstream, row % t.batch);
  if (factor == acc_t(1)) return;
  const int64_t begin = row * t.length + segment * kTileElements;
  const int64_t end = min(begin + kTileElements, (row + 1) * t.length);
  if (t.vectorized) {
    for (int64_t i = begin + threadIdx.x * int64_t(kVec); i < end; i += int64_t(blockDim.x) * kVec) {
      acc_t values[kVec];
      load_vector<kVec>(t.grad, i, values);
#pragma unroll
      for (int e = 0; e < kVec; ++e) values[e] *= factor;
      store_vector<kVec>(t.grad, i, values);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      store(t.grad, i, load<acc_t>(t.grad, i) * factor);
    }
  }
}

__global__ void scale_kernel(ScaleLaunch s, bool per_row) {
  // Compared in float64, so that no float64 gradient is left unscaled by a float32 tie.
  if (!per_row && load<double>(s.upstream, 0) == 1.0) return;
  for (int64_t tile = blockIdx.x; tile < s.tiles; tile += gridDim.x) {
    int target = 0;
    while (target + 1 < s.count && tile >= s.targets[target + 1].first_tile) ++target;
    const ScaleTarget& t = s.targets[target];
    const int64_t local = tile - t.first_tile;
    const int64_t row = local / t.tiles_per_row, segment = local % t.tiles_per_row;
    if (t.grad.type == DType::Double) {
      scale_tile<double>(s, t, row, segment);
    } else {
      scale_tile<float>(s, t, row, segment);
    }
  }
}

ScaleTarget scale_target(const at::Tensor& grad, bool per_row, int64_t first_tile) {
  ScaleTarget t{buffer_of(grad)};
  t.rows = per_row ? grad.size(0) * grad.size(1) : 1;
  t.length = per_row ? grad.size(2) : grad.numel();
  t.tiles_per_row = (t.length + kTileElements - 1) / kTileElements;
  t.first_tile = first_tile;
  t.batch = per_row ? grad.size(1) : 1;
  t.vectorized = t.length % kVec == 0 && aligned_16(t.grad);
  return t;
}

void launch_group(at::TensorList grads, const at::Tensor& upstream, cudaStream_t stream) {
  const bool per_row = upstream.dim() == 1;
  ScaleLaunch s{buffer_of(upstream), 0, 0};
  for (const at::Tensor& grad : grads) {
    if (grad.numel() == 0) continue;
    s.targets[s.count] = scale_target(grad, per_row, s.tiles);
    s.tiles += s.targets[s.count].rows * s.targets[s.count].tiles_per_row;
    ++s.count;
  }
  if (s.tiles == 0) return;
  const auto blocks = static_cast<unsigned int>(std::min(s.tiles, kMaxBlocks));
  scale_kernel<<<blocks, kThreads, 0, stream>>>(s, per_row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void scale_cuda(at::TensorList grads, const at::Tensor& upstream) {
  check_scale_args(grads, upstream);
  const c10::cuda::CUDAGuard guard(upstream.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t first = 0; first < grads.size(); first += kMaxTargets) {
    launch_group(grads.slice(first, std::min<size_t>(kMaxTargets, grads.size() - first)), upstream,
                 stream);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("scale_", &fastvae::cuda::scale_cuda);
}
