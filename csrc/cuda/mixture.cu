// The mixture prior's log-ratio op pair on CUDA (contract: fastvae.backends.reference).
//
// Simple layouts, every sum in a fixed order (no atomics):
// * forward_kernel: a block per row (s, b). Thread t takes the components t, t + 256, …,
//   computing logits_k + c_k over d from the transposed tables (a warp reads 32 adjacent
//   components of a dim), and keeps an online log-sum-exp; the block merges the threads' in a
//   fixed tree. log q is a block sum over d.
// * backward_kernel: a block per row, over the components a tile of 256 at a time. Thread t forms
//   r_k = exp(logits_k + c_k − log_prior_sum) for its component and adds the component's
//   gradients (weighted by −g·r_k) into the block's own row of partial sums; the tile's r_k go to
//   shared memory, from which a thread per latent dim adds Σ_k r_k(z − m_k)e^−v_k into a
//   [S·B, d] scratch. The partial rows are added up by ATen's (deterministic) sum.
// * latent_grads_kernel: a thread per (b, j): z's gradient from the scratch, and mu's and
//   logvar's gradients summed over s in order.
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include "../mixture_args.h"
#include "../mixture_math.h"
#include "common.cuh"

namespace fastvae {
namespace cuda {
namespace {

// Blocks of the backward at most (each owns a row of partial sums), and partial-sum values at
// most (16 MiB of float32), which bounds the blocks for large K·d.
constexpr int64_t kMaxBackwardBlocks = 1024;
constexpr int64_t kPartialElements = int64_t(1) << 22;

// The component tables (see mixture_args.h) as the kernels read them.
template <typename acc_t>
struct Tables {
  const acc_t* means_t;    // [d, padded]
  const acc_t* inv_var_t;  // [d, padded]
  const acc_t* means;      // [K, d]
  const acc_t* inv_var;    // [K, d]
  const acc_t* offsets;    // [padded]
  int64_t latent, components, padded;

  // logits_k + c_k at the sample in row `row` of z.
  __device__ acc_t term(const Buffer& z, int64_t row, int64_t k) const {
    acc_t square_sum = 0;
    for (int64_t j = 0; j < latent; ++j) {
      const acc_t residual = load<acc_t>(z, row * latent + j) - means_t[j * padded + k];
      square_sum += residual * residual * inv_var_t[j * padded + k];
    }
    return offsets[k] - acc_t(0.5) * square_sum;
  }
};

template <typename acc_t>
Tables<acc_t> tables_of(const MixtureArgs& a, const MixtureComponents& c) {
  return {c.means_t.const_data_ptr<acc_t>(), c.inv_var_t.const_data_ptr<acc_t>(),
          c.means.const_data_ptr<acc_t>(),   c.inv_var.const_data_ptr<acc_t>(),
          c.offsets.const_data_ptr<acc_t>(), a.latent, a.components, c.padded};
}

// The block's log-sum-exp streams merged in a fixed tree; every thread gets the result.
template <typename acc_t>
__device__ BranchlessLogSumExp<acc_t> block_log_sum_exp(
    const BranchlessLogSumExp<acc_t>& mine) {
  __shared__ acc_t maxima[kThreads];
  __shared__ acc_t sums[kThreads];
  maxima[threadIdx.x] = mine.maximum;
  sums[threadIdx.x] = mine.sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      BranchlessLogSumExp<acc_t> merged{maxima[threadIdx.x], sums[threadIdx.x]};
      merged.add(maxima[threadIdx.x + stride], sums[threadIdx.x + stride]);
      maxima[threadIdx.x] = merged.maximum;
      sums[threadIdx.x] = merged.sum;
    }
    __syncthreads();
  }
  const BranchlessLogSumExp<acc_t> total{maxima[0], sums[0]};
  __syncthreads();
  return total;
}

// q(z|x) = N(mu, e^logvar) at the sample in row `row` (datapoint row % B).
struct Posterior {
  Buffer z, mu, logvar;
  int64_t batch, latent;

  // (z − μ) and (z − μ)e^−λ of element j.
  template <typename acc_t>
  __device__ void residuals(int64_t row, int64_t j, acc_t& residual, acc_t& scaled) const {
    const int64_t index = (row % batch) * latent + j;
    residual = load<acc_t>(z, row * latent + j) - load<acc_t>(mu, index);
    scaled = residual * MathOps<acc_t>::exp(-load<acc_t>(logvar, index));
  }
};

template <typename acc_t>
__global__ void forward_kernel(Tables<acc_t> t, Posterior q, const acc_t* log_norm, int64_t rows,
                               acc_t* log_ratio, acc_t* log_prior_sum) {
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    BranchlessLogSumExp<acc_t> mine;
    for (int64_t k = threadIdx.x; k < t.components; k += blockDim.x) mine.add(t.term(q.z, row, k));
    const acc_t log_prior = block_log_sum_exp(mine).value();
    acc_t q_terms = 0;
    for (int64_t j = threadIdx.x; j < t.latent; j += blockDim.x) {
      acc_t residual, scaled;
      q.residuals(row, j, residual, scaled);
      q_terms += residual * scaled + load<acc_t>(q.logvar, (row % q.batch) * t.latent + j);
    }
    const acc_t log_q = acc_t(-0.5) * block_sum(q_terms);
    if (threadIdx.x == 0) {
      log_prior_sum[row] = log_prior;
      log_ratio[row] = log_q - (log_prior - *log_norm);
    }
  }
}

// Component k's gradients at one row, weighted by coef = −g·r_k, added into `partial`.
template <typename acc_t>
__device__ void add_component_grads(const Tables<acc_t>& t, const Buffer& z, int64_t row,
                                    int64_t k, acc_t coef, acc_t* partial) {
  const int64_t table = t.latent * t.padded;
  for (int64_t j = 0; j < t.latent; ++j) {
    const int64_t index = j * t.padded + k;
    const acc_t residual = load<acc_t>(z, row * t.latent + j) - t.means_t[index];
    const acc_t scaled = residual * t.inv_var_t[index];
    partial[index] += coef * scaled;
    partial[table + index] += coef * log_variance_gradient(residual, scaled);
  }
  partial[2 * table + k] += coef;
}

// z_sum[row, j] += Σ_k r_k(z − m_k)e^−v_k over the `count` components of the tile from k0.
template <typename acc_t>
__device__ void add_z_terms(const Tables<acc_t>& t, const Buffer& z, int64_t row, int64_t k0,
                            int64_t count, const acc_t* responsibilities, acc_t* z_sum) {
  for (int64_t j = threadIdx.x; j < t.latent; j += blockDim.x) {
    const acc_t value = load<acc_t>(z, row * t.latent + j);
    acc_t total = 0;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t index = (k0 + i) * t.latent + j;
      total += responsibilities[i] * (value - t.means[index]) * t.inv_var[index];
    }
    z_sum[row * t.latent + j] += total;
  }
}

// z_sum: [S·B, d] zeros, or null when z's gradient is not wanted; partials: [gridDim.x,
// columns] zeros, or null when no component gradient is wanted.
template <typename acc_t>
__global__ void backward_kernel(Tables<acc_t> t, Buffer z, const acc_t* grad,
                                const acc_t* log_prior_sum, int64_t rows, int64_t columns,
                                acc_t* z_sum, acc_t* partials) {
  __shared__ acc_t responsibilities[kThreads];
  acc_t* partial = partials ? partials + blockIdx.x * columns : nullptr;
  acc_t grad_total = 0;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const acc_t g = grad[row];
    grad_total += g;
    for (int64_t k0 = 0; k0 < t.components; k0 += kThreads) {
      const int64_t k = k0 + threadIdx.x;
      acc_t responsibility = 0;
      if (k < t.components) {
        responsibility = MathOps<acc_t>::exp(t.term(z, row, k) - log_prior_sum[row]);
        if (partial) add_component_grads(t, z, row, k, -g * responsibility, partial);
      }
      responsibilities[threadIdx.x] = responsibility;
      __syncthreads();
      if (z_sum) {
        add_z_terms(t, z, row, k0, min(int64_t(kThreads), t.components - k0), responsibilities,
                    z_sum);
      }
      __syncthreads();
    }
  }
  if (partial && threadIdx.x == 0) partial[columns - 1] = grad_total;
}

// A thread per (b, j): z's gradient g·(z_sum − (z − μ)e^−λ) per sample, and Σ_s of g·∂ log q
// for mu and logvar. grads: z, mu, logvar, null where not wanted.
template <typename acc_t>
__global__ void latent_grads_kernel(Posterior q, int64_t samples, const acc_t* grad,
                                    const acc_t* z_sum, Buffer grad_z, Buffer grad_mu,
                                    Buffer grad_logvar) {
  const int64_t elements = q.batch * q.latent;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < elements;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = e / q.latent, j = e % q.latent;
    acc_t mu_total = 0, logvar_total = 0;
    for (int64_t s = 0; s < samples; ++s) {
      const int64_t row = s * q.batch + b;
      acc_t residual, scaled;
      q.residuals(row, j, residual, scaled);
      if (grad_z.data) {
        store(grad_z, row * q.latent + j, grad[row] * (z_sum[row * q.latent + j] - scaled));
      }
      mu_total += grad[row] * scaled;
      logvar_total += grad[row] * log_variance_gradient(residual, scaled);
    }
    if (grad_mu.data) store(grad_mu, e, mu_total);
    if (grad_logvar.data) store(grad_logvar, e, logvar_total);
  }
}

Posterior posterior(const MixtureArgs& a) {
  return {buffer_of(*a.z), buffer_of(*a.mu), buffer_of(*a.logvar), a.batch, a.latent};
}

template <typename acc_t>
void launch_forward(const MixtureArgs& a, const MixtureComponents& c, at::Tensor& log_ratio,
                    at::Tensor& log_prior_sum) {
  const int64_t rows = a.samples * a.batch;
  if (rows == 0) return;
  forward_kernel<acc_t><<<blocks_for(rows, 1), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tables_of<acc_t>(a, c), posterior(a), c.log_norm.const_data_ptr<acc_t>(), rows,
      log_ratio.mutable_data_ptr<acc_t>(), log_prior_sum.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Buffer wanted(const std::array<at::Tensor, 6>& grads, const MixtureNeeds& needs, int slot) {
  return needs[slot] ? buffer_of(grads[slot]) : Buffer{};
}

// The gradients of z, mu and logvar, from the z scratch (undefined when z's is not wanted).
template <typename acc_t>
void launch_latent_grads(const MixtureArgs& a, const at::Tensor& grad, const at::Tensor& z_sum,
                         const MixtureNeeds& needs, std::array<at::Tensor, 6>& grads) {
  if (!(needs[0] || needs[1] || needs[2]) || a.batch * a.latent == 0) return;
  latent_grads_kernel<acc_t><<<blocks_for(a.batch * a.latent), kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
      posterior(a), a.samples, grad.const_data_ptr<acc_t>(),
      z_sum.defined() ? z_sum.const_data_ptr<acc_t>() : nullptr, wanted(grads, needs, 0),
      wanted(grads, needs, 1), wanted(grads, needs, 2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
void launch_backward(const MixtureArgs& a, const MixtureComponents& c, const at::Tensor& grad,
                     const at::Tensor& log_prior_sum, const MixtureNeeds& needs,
                     std::array<at::Tensor, 6>& grads) {
  const auto options = grad.options();
  const int64_t rows = a.samples * a.batch, columns = partial_columns(a, c);
  const bool component_grads = needs[3] || needs[4] || needs[5];
  const int64_t blocks = std::clamp<int64_t>(
      std::min({rows, kMaxBackwardBlocks, kPartialElements / columns}), 1, kMaxBackwardBlocks);
  const at::Tensor z_sum = needs[0] ? at::zeros({rows, a.latent}, options) : at::Tensor();
  const at::Tensor partials = at::zeros({component_grads ? blocks : 0, columns}, options);
  if (rows > 0 && (needs[0] || component_grads)) {
    backward_kernel<acc_t><<<static_cast<unsigned int>(blocks), kThreads, 0,
                             c10::cuda::getCurrentCUDAStream()>>>(
        tables_of<acc_t>(a, c), buffer_of(*a.z), grad.const_data_ptr<acc_t>(),
        log_prior_sum.const_data_ptr<acc_t>(), rows, columns,
        needs[0] ? z_sum.mutable_data_ptr<acc_t>() : nullptr,
        component_grads ? partials.mutable_data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (component_grads) store_component_grads(a, c, partials.sum(0), grads);
  launch_latent_grads<acc_t>(a, grad, z_sum, needs, grads);
}

MixtureForward mixture_log_ratio_cuda(const at::Tensor& z, const at::Tensor& mu,
                                      const at::Tensor& logvar, const at::Tensor& means,
                                      const at::Tensor& logvars, const at::Tensor& logits) {
  return mixture_forward(z, mu, logvar, means, logvars, logits,
                         {&launch_forward<float>, &launch_forward<double>});
}

MixtureGrads mixture_log_ratio_backward_cuda(const at::Tensor& grad, const at::Tensor& z,
                                             const at::Tensor& mu, const at::Tensor& logvar,
                                             const at::Tensor& means, const at::Tensor& logvars,
                                             const at::Tensor& logits,
                                             const at::Tensor& log_prior_sum, MixtureNeeds needs) {
  return mixture_backward(grad, z, mu, logvar, means, logvars, logits, log_prior_sum, needs,
                          {&launch_backward<float>, &launch_backward<double>});
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("mixture_log_ratio", &fastvae::cuda::mixture_log_ratio_cuda);
  m.impl("mixture_log_ratio_backward", &fastvae::cuda::mixture_log_ratio_backward_cuda);
}
