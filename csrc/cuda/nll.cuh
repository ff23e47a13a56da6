// The decoder terms on CUDA, shared by the ELBO's NLL pass (nll.cu) and the importance-weighted
// bound (iwae.cu): x [B, D], x_hat [S, B, D] and θ [Sl, Bl, Dl] (each 1 or S, B, D) or a constant.
// nll_columns forms the NLL and writes the per-element gradients of a row's columns, each sample
// weighted by NllArgs::weight; θ gradients that are sums across rows (θ broadcast over B, or one
// θ per row) are formed by further kernels that recompute the terms, a thread per output looping
// in a fixed order.
#pragma once

#include "../likelihoods.h"
#include "elbo.cuh"

namespace fastvae {
namespace cuda {

template <typename acc_t>
struct NllArgs {
  int64_t samples, batch, features;
  Buffer x, x_hat, x_log_scale;  // x_log_scale θ [Sl, Bl, Dl]; null: the constant
  int64_t scale_samples, scale_batch, scale_features;
  acc_t log_scale_constant;
  RowWeights<acc_t> weights;
  Buffer grad_x, grad_x_hat, grad_x_log_scale;
  // [S, B] the softmax weights w̃ of the importance-weighted bound; null: the ELBO's mean, 1/S.
  const acc_t* normalised = nullptr;

  __host__ __device__ bool scale_per_sample() const { return scale_samples == samples; }
  __host__ __device__ bool scale_per_row() const { return scale_batch == batch; }
  __host__ __device__ bool element_scale() const { return x_log_scale.data && scale_features != 1; }

  // The weight of sample s of row b in the gradient: w_b·w̃[s, b], or w_b / S.
  __device__ acc_t weight(int64_t s, int64_t b) const {
    return normalised ? weights(b) * normalised[s * batch + b] : weights(b) / static_cast<acc_t>(samples);
  }

  // Offset of the θ row that sample s of row b uses.
  __device__ int64_t scale_row(int64_t s, int64_t b) const {
    return ((scale_per_sample() ? s : 0) * scale_batch + (scale_per_row() ? b : 0)) * scale_features;
  }

  // θ for the kVec elements from j of sample s, row b.
  template <int kVec>
  __device__ void log_scales(int64_t s, int64_t b, int64_t j, acc_t (&theta)[kVec]) const {
    if (element_scale()) return load_vector<kVec>(x_log_scale, scale_row(s, b) + j, theta);
    const acc_t value = x_log_scale.data ? load<acc_t>(x_log_scale, scale_row(s, b)) : log_scale_constant;
#pragma unroll
    for (int e = 0; e < kVec; ++e) theta[e] = value;
  }

  template <typename Nll>
  __device__ NllTerms<acc_t> element(int64_t s, int64_t b, int64_t j) const {
    acc_t theta[1];
    log_scales<1>(s, b, j, theta);
    return Nll::terms(load<acc_t>(x, b * features + j), load<acc_t>(x_hat, (s * batch + b) * features + j),
                      theta[0], inverse_scale(theta[0]));
  }
};

// Elements [j, j + kVec) of row b over all samples; returns their NLL sum. The θ gradient is
// written here only where θ is per element and per row.
template <typename Nll, int kVec, typename acc_t>
__device__ acc_t nll_columns(const NllArgs<acc_t>& a, int64_t b, int64_t j) {
  const bool scale_grad = Nll::kUsesScale && a.grad_x_log_scale.data && a.element_scale() && a.scale_per_row();
  acc_t x[kVec], grad_x_sum[kVec] = {}, grad_scale_sum[kVec] = {};
  load_vector<kVec>(a.x, b * a.features + j, x);
  acc_t nll_sum = 0;
  for (int64_t s = 0; s < a.samples; ++s) {
    const int64_t index = (s * a.batch + b) * a.features + j;
    const acc_t weight = a.weight(s, b);
    acc_t mean[kVec], theta[kVec], grad_mean[kVec], grad_scale[kVec];
    load_vector<kVec>(a.x_hat, index, mean);
    if constexpr (Nll::kUsesScale) {
      a.log_scales(s, b, j, theta);
    } else {
      for (acc_t& value : theta) value = 0;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const NllTerms<acc_t> t = Nll::terms(x[e], mean[e], theta[e], inverse_scale(theta[e]));
      nll_sum += t.nll;
      grad_x_sum[e] += t.grad_x * weight;
      grad_mean[e] = t.grad_x_hat * weight;
      grad_scale[e] = t.grad_log_scale * weight;
      grad_scale_sum[e] += grad_scale[e];
    }
    if (a.grad_x_hat.data) store_vector<kVec>(a.grad_x_hat, index, grad_mean);
    if (scale_grad && a.scale_per_sample()) store_vector<kVec>(a.grad_x_log_scale, index, grad_scale);
  }
  if (a.grad_x.data) store_vector<kVec>(a.grad_x, b * a.features + j, grad_x_sum);
  if (scale_grad && !a.scale_per_sample()) store_vector<kVec>(a.grad_x_log_scale, b * a.features + j, grad_scale_sum);
  return nll_sum;
}

// θ one value per (sample, row): Σ_j ∂θ·w per (s, b) row.
template <typename Nll, typename acc_t>
__global__ void scale_row_sums_kernel(NllArgs<acc_t> a, acc_t* row_sums) {
  for (int64_t row = blockIdx.x; row < a.samples * a.batch; row += gridDim.x) {
    const int64_t s = row / a.batch, b = row % a.batch;
    const acc_t weight = a.weight(s, b);
    acc_t sum = 0;
    for (int64_t j = threadIdx.x; j < a.features; j += blockDim.x) {
      sum += a.template element<Nll>(s, b, j).grad_log_scale * weight;
    }
    const acc_t total = block_sum(sum);
    if (threadIdx.x == 0) row_sums[row] = total;
  }
}

// grad_x_log_scale[sl, bl] = Σ of row_sums over the samples and rows it was broadcast along.
template <typename acc_t>
__global__ void scalar_scale_grad_kernel(NllArgs<acc_t> a, const acc_t* row_sums) {
  const int64_t outputs = a.scale_samples * a.scale_batch;
  const bool per_sample = a.scale_per_sample(), per_row = a.scale_per_row();
  for (int64_t out = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; out < outputs;
       out += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sl = out / a.scale_batch, bl = out % a.scale_batch;
    acc_t total = 0;
    for (int64_t s = per_sample ? sl : 0; s < (per_sample ? sl + 1 : a.samples); ++s) {
      for (int64_t b = per_row ? bl : 0; b < (per_row ? bl + 1 : a.batch); ++b) {
        total += row_sums[s * a.batch + b];
      }
    }
    store(a.grad_x_log_scale, out, total);
  }
}

// θ [Sl, 1, D] shared by the batch: a thread per (sl, j) sums over rows in order.
template <typename Nll, typename acc_t>
__global__ void scale_column_grad_kernel(NllArgs<acc_t> a) {
  const int64_t outputs = a.scale_samples * a.features;
  const bool per_sample = a.scale_per_sample();
  for (int64_t out = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; out < outputs;
       out += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sl = out / a.features, j = out % a.features;
    acc_t total = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      for (int64_t s = per_sample ? sl : 0; s < (per_sample ? sl + 1 : a.samples); ++s) {
        total += a.template element<Nll>(s, b, j).grad_log_scale * a.weight(s, b);
      }
    }
    store(a.grad_x_log_scale, out, total);
  }
}

// The decoder part of a call to elbo or iwae (both have x, x_hat, x_log_scale in slots 0..2). A
// likelihood without θ has a zero θ gradient, written by allocate_gradients: none is asked for.
template <typename acc_t, typename Args, typename Outputs>
NllArgs<acc_t> nll_args(const Args& args, const Outputs& out, RowWeights<acc_t> weights) {
  NllArgs<acc_t> a{args.samples, args.batch, args.features, buffer_of(*args.x),
                   buffer_of(*args.x_hat), optional_buffer(args.x_log_scale), 1, 1, 1,
                   static_cast<acc_t>(args.x_log_scale_const), weights,
                   gradient_buffer(args, out, kX), gradient_buffer(args, out, kXHat),
                   uses_scale(args.likelihood) ? gradient_buffer(args, out, kXLogScale) : Buffer{}};
  if (args.x_log_scale) {
    a.scale_samples = args.x_log_scale->size(0);
    a.scale_batch = args.x_log_scale->size(1);
    a.scale_features = args.x_log_scale->size(2);
  }
  return a;
}

// Whether every row of every buffer the main kernel touches starts 16-byte aligned.
template <typename acc_t>
bool rows_aligned(const NllArgs<acc_t>& a) {
  const bool scale_ok = !a.element_scale() || aligned_16(a.x_log_scale);
  return a.features % kVec == 0 && scale_ok && aligned_16(a.x) && aligned_16(a.x_hat) &&
         aligned_16(a.grad_x) && aligned_16(a.grad_x_hat) && aligned_16(a.grad_x_log_scale);
}

// The θ gradients that are sums across rows.
template <typename Nll, typename acc_t>
void launch_scale_sums(const NllArgs<acc_t>& a, const at::TensorOptions& options, cudaStream_t stream) {
  if (!a.element_scale()) {
    at::Tensor row_sums = at::empty({a.samples * a.batch}, options);
    if (row_sums.numel() > 0) {
      scale_row_sums_kernel<Nll><<<blocks_for(row_sums.numel(), 1), kThreads, 0, stream>>>(
          a, row_sums.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    scalar_scale_grad_kernel<<<blocks_for(a.scale_samples * a.scale_batch), kThreads, 0, stream>>>(
        a, row_sums.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (!a.scale_per_row() && a.features > 0) {
    scale_column_grad_kernel<Nll><<<blocks_for(a.scale_samples * a.features), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace cuda
}  // namespace fastvae
