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
#include <cstdint>
#include <cstring>

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

// 16-byte vector access: kVec consecutive elements from `index` (a multiple of kVec, the data
// 16-byte aligned), converted to or from acc_t like load and store. Fewer, wider loads keep
// more bytes in flight per thread, which a bandwidth-bound kernel needs.
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t widen(T value) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<acc_t>(static_cast<float>(value));
  } else {
    return static_cast<acc_t>(value);
  }
}

template <typename T, typename acc_t>
__device__ __forceinline__ T narrow(acc_t value) {
  if constexpr (sizeof(T) == 2) {
    return T(static_cast<float>(value));
  } else {
    return static_cast<T>(value);
  }
}

template <typename T, int kVec, typename acc_t>
__device__ __forceinline__ void load_packed(const void* data, int64_t index, acc_t (&out)[kVec]) {
  static_assert(kVec * sizeof(T) % 16 == 0, "whole 16-byte words only");
  constexpr int kPerWord = 16 / sizeof(T);
  const uint4* words = reinterpret_cast<const uint4*>(static_cast<const T*>(data) + index);
#pragma unroll
  for (int w = 0; w < kVec / kPerWord; ++w) {
    const uint4 bits = words[w];
    T values[kPerWord];
    memcpy(values, &bits, sizeof(bits));
#pragma unroll
    for (int e = 0; e < kPerWord; ++e) out[w * kPerWord + e] = widen<acc_t>(values[e]);
  }
}

template <typename T, int kVec, typename acc_t>
__device__ __forceinline__ void store_packed(void* data, int64_t index, const acc_t (&in)[kVec]) {
  static_assert(kVec * sizeof(T) % 16 == 0, "whole 16-byte words only");
  constexpr int kPerWord = 16 / sizeof(T);
  uint4* words = reinterpret_cast<uint4*>(static_cast<T*>(data) + index);
#pragma unroll
  for (int w = 0; w < kVec / kPerWord; ++w) {
    T values[kPerWord];
#pragma unroll
    for (int e = 0; e < kPerWord; ++e) values[e] = narrow<T>(in[w * kPerWord + e]);
    uint4 bits;
    memcpy(&bits, values, sizeof(bits));
    words[w] = bits;
  }
}

// kVec = 1 is the plain element access, for rows that are not aligned.
template <int kVec, typename acc_t>
__device__ __forceinline__ void load_vector(const Buffer& buffer, int64_t index, acc_t (&out)[kVec]) {
  if constexpr (kVec == 1) {
    out[0] = load<acc_t>(buffer, index);
  } else {
    switch (buffer.type) {
      case DType::Double: return load_packed<double>(buffer.data, index, out);
      case DType::Half: return load_packed<c10::Half>(buffer.data, index, out);
      case DType::BFloat16: return load_packed<c10::BFloat16>(buffer.data, index, out);
      default: return load_packed<float>(buffer.data, index, out);
    }
  }
}

template <int kVec, typename acc_t>
__device__ __forceinline__ void store_vector(const Buffer& buffer, int64_t index, const acc_t (&in)[kVec]) {
  if constexpr (kVec == 1) {
    store(buffer, index, in[0]);
  } else {
    switch (buffer.type) {
      case DType::Double: return store_packed<double>(buffer.data, index, in);
      case DType::Half: return store_packed<c10::Half>(buffer.data, index, in);
      case DType::BFloat16: return store_packed<c10::BFloat16>(buffer.data, index, in);
      default: return store_packed<float>(buffer.data, index, in);
    }
  }
}

// Elements per thread on the vector paths: one 16-byte word of a 16-bit dtype, two of float32.
constexpr int kVec = 8;

// Whether a buffer (null counts as yes) can take the vector paths' 16-byte accesses.
inline bool aligned_16(const Buffer& buffer) {
  return reinterpret_cast<uintptr_t>(buffer.data) % 16 == 0;
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
