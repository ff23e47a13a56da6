// Helpers shared by the CUDA kernels: dtype-erased loads and stores (each input keeps its own
// dtype without a template instantiation per combination), launch shapes and a deterministic
// block reduction (a fixed tree, no atomics).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace fastvae {
namespace cuda {

constexpr int kThreads = 256;

enum class DType : int { Float, Double, Half, BFloat16 };

inline DType dtype_of(const at::Tensor& tensor) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return DType::Float;
    case at::kDouble: return DType::Double;
    case at::kHalf: return DType::Half;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK(false, "fastvae_native: unsupported dtype ", tensor.scalar_type());
  }
}

// A tensor's data with its dtype; null when absent or not wanted.
struct Buffer {
  void* data = nullptr;
  DType type = DType::Float;
};

inline Buffer buffer_of(const at::Tensor& tensor) {
  return {const_cast<void*>(tensor.const_data_ptr()), dtype_of(tensor)};
}

template <typename acc_t>
__device__ __forceinline__ acc_t load(const Buffer& buffer, int64_t index) {
  switch (buffer.type) {
    case DType::Double: return static_cast<acc_t>(static_cast<const double*>(buffer.data)[index]);
    case DType::Half:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(buffer.data)[index]));
    case DType::BFloat16:
      return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(buffer.data)[index]));
    default: return static_cast<acc_t>(static_cast<const float*>(buffer.data)[index]);
  }
}

// Rounds like torch's casts: to float first for the 16-bit types.
template <typename acc_t>
__device__ __forceinline__ void store(const Buffer& buffer, int64_t index, acc_t value) {
  switch (buffer.type) {
    case DType::Double: static_cast<double*>(buffer.data)[index] = static_cast<double>(value); break;
    case DType::Half:
      static_cast<c10::Half*>(buffer.data)[index] = c10::Half(static_cast<float>(value));
      break;
    case DType::BFloat16:
      static_cast<c10::BFloat16*>(buffer.data)[index] = c10::BFloat16(static_cast<float>(value));
      break;
    default: static_cast<float*>(buffer.data)[index] = static_cast<float>(value); break;
  }
}

inline unsigned int blocks_for(int64_t work, int64_t per_block = kThreads) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<unsigned int>(std::clamp<int64_t>(blocks, 1, 65535));
}

// Sum over the block's kThreads values in a fixed tree order; every thread gets the total.
template <typename acc_t>
__device__ acc_t block_sum(acc_t value) {
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const acc_t total = shared[0];
  __syncthreads();
  return total;
}

inline void check_cuda_input(const char* name, const at::Tensor& tensor, const at::Device& device) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.device() == device,
              "fastvae_native: ", name, " must be contiguous on ", device, ", got ",
              tensor.device());
}

}  // namespace cuda
}  // namespace fastvae
