// The fused ELBO on CUDA. One block per datapoint row computes the NLL row sum and writes the
// per-element gradients; sums across rows (a broadcast input's gradient, the free-bits batch
// mean) are done by a thread per column looping over rows in order. Every sum has a fixed
// order, so results are deterministic; no atomics, and beta and the weights are read on the
// device (no host sync).
#include <torch/library.h>

#include <array>
#include <optional>

#include "../elementwise.h"
#include "common.cuh"

namespace fastvae {
namespace cuda {
namespace {

enum Input { kX, kXHat, kXLogvar, kMu, kLogvar, kPriorMu, kPriorLogvar, kInputCount };

// Weight w_b of row b in the loss whose gradient is formed.
template <typename acc_t>
struct RowWeights {
  Buffer grad_scale;  // [B], or null: every row weighs `uniform`
  acc_t uniform;
  __device__ acc_t operator()(int64_t b) const {
    return grad_scale.data ? load<acc_t>(grad_scale, b) : uniform;
  }
};

// ------------------------------------------------------------------------------------------
// NLL
// ------------------------------------------------------------------------------------------
template <typename acc_t>
struct NllArgs {
  int64_t samples, batch, features;
  Buffer x, x_hat, x_logvar;  // x_logvar null: the constant
  int64_t logvar_samples, logvar_batch, logvar_features;
  acc_t logvar_constant;
  bool bernoulli;
  RowWeights<acc_t> weights;
  Buffer grad_x, grad_x_hat, grad_x_logvar;

  __device__ bool logvar_per_sample() const { return logvar_samples == samples; }
  __device__ bool logvar_per_row() const { return logvar_batch == batch; }

  __device__ acc_t logvar(int64_t s, int64_t b, int64_t j) const {
    if (!x_logvar.data) return logvar_constant;
    const int64_t row = (logvar_per_sample() ? s : 0) * logvar_batch + (logvar_per_row() ? b : 0);
    return load<acc_t>(x_logvar, row * logvar_features + (logvar_features == 1 ? 0 : j));
  }

  __device__ void element(int64_t s, int64_t b, int64_t j, acc_t& nll, acc_t& grad_x_value,
                          acc_t& grad_mean, acc_t& grad_logvar) const {
    const acc_t x_value = load<acc_t>(x, b * features + j);
    const acc_t mean = load<acc_t>(x_hat, (s * batch + b) * features + j);
    grad_logvar = 0;
    if (bernoulli) {
      bernoulli_nll(x_value, mean, nll, grad_x_value, grad_mean);
    } else {
      gaussian_nll(x_value, mean, logvar(s, b, j), nll, grad_x_value, grad_mean, grad_logvar);
    }
  }
};

template <typename acc_t>
__global__ void nll_rows_kernel(NllArgs<acc_t> a, acc_t* nll_rows) {
  const bool element_logvar_grad = a.grad_x_logvar.data && a.logvar_features != 1 && a.logvar_per_row();
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    const acc_t weight = a.weights(b) / static_cast<acc_t>(a.samples);
    acc_t nll_sum = 0;
    for (int64_t j = threadIdx.x; j < a.features; j += blockDim.x) {
      acc_t grad_x_sum = 0, grad_logvar_sum = 0;
      for (int64_t s = 0; s < a.samples; ++s) {
        acc_t nll, grad_x, grad_mean, grad_logvar;
        a.element(s, b, j, nll, grad_x, grad_mean, grad_logvar);
        nll_sum += nll;
        const int64_t index = (s * a.batch + b) * a.features + j;
        if (a.grad_x_hat.data) store(a.grad_x_hat, index, grad_mean * weight);
        grad_x_sum += grad_x * weight;
        if (element_logvar_grad) {
          if (a.logvar_per_sample()) {
            store(a.grad_x_logvar, index, grad_logvar * weight);
          } else {
            grad_logvar_sum += grad_logvar * weight;
          }
        }
      }
      if (a.grad_x.data) store(a.grad_x, b * a.features + j, grad_x_sum);
      if (element_logvar_grad && !a.logvar_per_sample()) {
        store(a.grad_x_logvar, b * a.features + j, grad_logvar_sum);
      }
    }
    const acc_t total = block_sum(nll_sum);
    if (threadIdx.x == 0) nll_rows[b] = total / static_cast<acc_t>(a.samples);
  }
}

// x_logvar one value per (sample, row): Σ_j d_logvar·w per (s, b) row.
template <typename acc_t>
__global__ void logvar_row_sums_kernel(NllArgs<acc_t> a, acc_t* row_sums) {
  for (int64_t row = blockIdx.x; row < a.samples * a.batch; row += gridDim.x) {
    const int64_t s = row / a.batch, b = row % a.batch;
    const acc_t weight = a.weights(b) / static_cast<acc_t>(a.samples);
    acc_t sum = 0;
    for (int64_t j = threadIdx.x; j < a.features; j += blockDim.x) {
      acc_t nll, grad_x, grad_mean, grad_logvar;
      a.element(s, b, j, nll, grad_x, grad_mean, grad_logvar);
      sum += grad_logvar * weight;
    }
    const acc_t total = block_sum(sum);
    if (threadIdx.x == 0) row_sums[row] = total;
  }
}

// grad_x_logvar[sl, bl] = Σ of row_sums over the samples and rows it was broadcast along.
template <typename acc_t>
__global__ void logvar_scalar_grad_kernel(NllArgs<acc_t> a, const acc_t* row_sums) {
  const int64_t outputs = a.logvar_samples * a.logvar_batch;
  for (int64_t out = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; out < outputs;
       out += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sl = out / a.logvar_batch, bl = out % a.logvar_batch;
    const bool per_sample = a.logvar_per_sample(), per_row = a.logvar_per_row();
    acc_t total = 0;
    for (int64_t s = per_sample ? sl : 0; s < (per_sample ? sl + 1 : a.samples); ++s) {
      for (int64_t b = per_row ? bl : 0; b < (per_row ? bl + 1 : a.batch); ++b) {
        total += row_sums[s * a.batch + b];
      }
    }
    store(a.grad_x_logvar, out, total);
  }
}

// x_logvar [Sl, 1, D] shared by the batch: a thread per (sl, j) sums over rows in order.
template <typename acc_t>
__global__ void logvar_column_grad_kernel(NllArgs<acc_t> a) {
  const int64_t outputs = a.logvar_samples * a.features;
  for (int64_t out = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; out < outputs;
       out += int64_t(gridDim.x) * blockDim.x) {
    const int64_t sl = out / a.features, j = out % a.features;
    const bool per_sample = a.logvar_per_sample();
    acc_t total = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      const acc_t weight = a.weights(b) / static_cast<acc_t>(a.samples);
      for (int64_t s = per_sample ? sl : 0; s < (per_sample ? sl + 1 : a.samples); ++s) {
        acc_t nll, grad_x, grad_mean, grad_logvar;
        a.element(s, b, j, nll, grad_x, grad_mean, grad_logvar);
        total += grad_logvar * weight;
      }
    }
    store(a.grad_x_logvar, out, total);
  }
}

// ------------------------------------------------------------------------------------------
// KL
// ------------------------------------------------------------------------------------------
template <typename acc_t>
struct KlArgs {
  int64_t batch, latent;
  Buffer mu, logvar, prior_mu, prior_logvar;  // prior null: the standard normal
  bool prior_per_row;
  acc_t free_bits;
  Buffer beta;
  RowWeights<acc_t> weights;
  Buffer grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar;

  __device__ acc_t kl_weight(int64_t b) const { return load<acc_t>(beta, 0) * weights(b); }

  __device__ void element(int64_t b, int64_t j, acc_t& kl, acc_t& grad_mu_value,
                          acc_t& grad_logvar_value, acc_t& grad_prior_logvar_value) const {
    const int64_t index = b * latent + j;
    const acc_t mu_value = load<acc_t>(mu, index), logvar_value = load<acc_t>(logvar, index);
    grad_prior_logvar_value = 0;
    if (prior_mu.data) {
      const int64_t prior_index = (prior_per_row ? b : 0) * latent + j;
      prior_kl(mu_value, logvar_value, load<acc_t>(prior_mu, prior_index),
               load<acc_t>(prior_logvar, prior_index), kl, grad_mu_value, grad_logvar_value,
               grad_prior_logvar_value);
    } else {
      standard_kl(mu_value, logvar_value, kl, grad_mu_value, grad_logvar_value);
    }
  }
};

// Free bits: active[j] = 1 if the batch mean of KL_bj reaches free_bits, else 0.
template <typename acc_t>
__global__ void free_bits_kernel(KlArgs<acc_t> a, acc_t* active) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < a.latent;
       j += int64_t(gridDim.x) * blockDim.x) {
    acc_t total = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      acc_t kl, grad_mu, grad_logvar, grad_prior_logvar;
      a.element(b, j, kl, grad_mu, grad_logvar, grad_prior_logvar);
      total += kl;
    }
    active[j] = total / static_cast<acc_t>(a.batch) >= a.free_bits ? acc_t(1) : acc_t(0);
  }
}

template <typename acc_t>
__global__ void kl_rows_kernel(KlArgs<acc_t> a, const acc_t* active, acc_t* kl_rows,
                               acc_t* kl_term_rows) {
  const bool prior_grads_per_row = a.prior_per_row;
  for (int64_t b = blockIdx.x; b < a.batch; b += gridDim.x) {
    const acc_t weight = a.kl_weight(b);
    acc_t kl_sum = 0, active_sum = 0, inactive_count = 0;
    for (int64_t j = threadIdx.x; j < a.latent; j += blockDim.x) {
      acc_t kl, grad_mu, grad_logvar, grad_prior_logvar;
      a.element(b, j, kl, grad_mu, grad_logvar, grad_prior_logvar);
      kl_sum += kl;
      acc_t scale = weight;
      if (active) {
        active_sum += kl * active[j];
        inactive_count += acc_t(1) - active[j];
        scale = scale * active[j];
      }
      const int64_t index = b * a.latent + j;
      if (a.grad_mu.data) store(a.grad_mu, index, grad_mu * scale);
      if (a.grad_logvar.data) store(a.grad_logvar, index, grad_logvar * scale);
      if (prior_grads_per_row && a.grad_prior_mu.data) store(a.grad_prior_mu, index, -grad_mu * scale);
      if (prior_grads_per_row && a.grad_prior_logvar.data) {
        store(a.grad_prior_logvar, index, grad_prior_logvar * scale);
      }
    }
    const acc_t kl_total = block_sum(kl_sum);
    const acc_t active_total = block_sum(active_sum);
    const acc_t inactive_total = block_sum(inactive_count);
    if (threadIdx.x == 0) {
      kl_rows[b] = kl_total;
      kl_term_rows[b] = active ? active_total + inactive_total * a.free_bits : kl_total;
    }
  }
}

// A prior shared by the batch ([1, d]): a thread per latent dim sums its gradients over rows.
template <typename acc_t>
__global__ void prior_column_grad_kernel(KlArgs<acc_t> a, const acc_t* active) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < a.latent;
       j += int64_t(gridDim.x) * blockDim.x) {
    acc_t mu_total = 0, logvar_total = 0;
    for (int64_t b = 0; b < a.batch; ++b) {
      acc_t kl, grad_mu, grad_logvar, grad_prior_logvar;
      a.element(b, j, kl, grad_mu, grad_logvar, grad_prior_logvar);
      const acc_t scale = active ? a.kl_weight(b) * active[j] : a.kl_weight(b);
      mu_total += -grad_mu * scale;
      logvar_total += grad_prior_logvar * scale;
    }
    if (a.grad_prior_mu.data) store(a.grad_prior_mu, j, mu_total);
    if (a.grad_prior_logvar.data) store(a.grad_prior_logvar, j, logvar_total);
  }
}

// loss = nll + beta * kl_term per row, then reduced by one block in a fixed order.
template <typename acc_t>
__global__ void loss_kernel(const acc_t* nll, const acc_t* kl_term, Buffer beta, int64_t batch,
                            int reduction, acc_t* loss) {
  const acc_t beta_value = load<acc_t>(beta, 0);
  acc_t sum = 0;
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) {
    const acc_t row = nll[b] + beta_value * kl_term[b];
    if (reduction == 0) {
      loss[b] = row;
    } else {
      sum += row;
    }
  }
  if (reduction == 0) return;
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) loss[0] = reduction == 1 ? total / static_cast<acc_t>(batch) : total;
}

// ------------------------------------------------------------------------------------------
// The op
// ------------------------------------------------------------------------------------------
using ElboOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename acc_t>
void launch(NllArgs<acc_t> nll_args, KlArgs<acc_t> kl_args, const at::Tensor& beta,
            int reduction, const at::TensorOptions& acc_options, at::Tensor& loss,
            at::Tensor& nll, at::Tensor& kl, at::Tensor& kl_term) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t batch = nll_args.batch;
  acc_t* nll_data = nll.mutable_data_ptr<acc_t>();
  if (batch > 0) {
    nll_rows_kernel<acc_t><<<blocks_for(batch, 1), kThreads, 0, stream>>>(nll_args, nll_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (nll_args.grad_x_logvar.data) {
    if (nll_args.logvar_features == 1) {
      at::Tensor row_sums = at::empty({nll_args.samples * batch}, acc_options);
      if (row_sums.numel() > 0) {
        logvar_row_sums_kernel<acc_t><<<blocks_for(row_sums.numel(), 1), kThreads, 0, stream>>>(
            nll_args, row_sums.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      logvar_scalar_grad_kernel<acc_t><<<blocks_for(nll_args.logvar_samples * nll_args.logvar_batch),
                                         kThreads, 0, stream>>>(nll_args, row_sums.const_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (nll_args.logvar_batch != batch && nll_args.features > 0) {
      logvar_column_grad_kernel<acc_t><<<blocks_for(nll_args.logvar_samples * nll_args.features),
                                         kThreads, 0, stream>>>(nll_args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  at::Tensor active;
  if (static_cast<double>(kl_args.free_bits) > 0 && kl_args.latent > 0) {
    active = at::empty({kl_args.latent}, acc_options);
    free_bits_kernel<acc_t><<<blocks_for(kl_args.latent), kThreads, 0, stream>>>(
        kl_args, active.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* active_data = active.defined() ? active.const_data_ptr<acc_t>() : nullptr;
  if (batch > 0) {
    // With free bits and d = 0 there is no active mask, and kl_term = kl = 0 as it should be.
    kl_rows_kernel<acc_t><<<blocks_for(batch, 1), kThreads, 0, stream>>>(
        kl_args, active_data, kl.mutable_data_ptr<acc_t>(), kl_term.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!kl_args.prior_per_row && (kl_args.grad_prior_mu.data || kl_args.grad_prior_logvar.data) &&
      kl_args.latent > 0) {
    prior_column_grad_kernel<acc_t><<<blocks_for(kl_args.latent), kThreads, 0, stream>>>(
        kl_args, active_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  loss_kernel<acc_t><<<1, kThreads, 0, stream>>>(nll.const_data_ptr<acc_t>(),
                                                  kl_term.const_data_ptr<acc_t>(), buffer_of(beta),
                                                  batch, reduction, loss.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

ElboOutputs elbo_cuda(const at::Tensor& x, const at::Tensor& x_hat,
                      const std::optional<at::Tensor>& x_logvar, double x_logvar_const,
                      const at::Tensor& mu, const at::Tensor& logvar,
                      const std::optional<at::Tensor>& prior_mu,
                      const std::optional<at::Tensor>& prior_logvar, const at::Tensor& beta,
                      double free_bits, bool bernoulli, c10::string_view reduction,
                      const std::optional<at::Tensor>& grad_scale, std::array<bool, 7> needs_grad) {
  const int reduction_code = reduction == "none" ? 0 : reduction == "mean" ? 1 : reduction == "sum" ? 2 : -1;
  TORCH_CHECK(reduction_code >= 0, "fastvae_native::elbo: reduction must be 'none', 'mean' or 'sum'");
  TORCH_CHECK(x.dim() == 2 && x_hat.dim() == 3 && mu.dim() == 2 && logvar.sizes() == mu.sizes(),
              "fastvae_native::elbo: expected x [B, D], x_hat [S, B, D], mu and logvar [B, d]");
  const int64_t samples = x_hat.size(0), batch = x.size(0), features = x.size(1);
  TORCH_CHECK(x_hat.size(1) == batch && x_hat.size(2) == features && mu.size(0) == batch,
              "fastvae_native::elbo: x_hat must be [S, ", batch, ", ", features, "] and mu [", batch, ", d]");
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "fastvae_native::elbo: give both prior_mu and prior_logvar or neither");
  const at::Device device = x.device();
  const std::optional<at::Tensor> inputs[kInputCount] = {x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar};
  for (const auto& input : inputs) {
    if (input.has_value()) check_cuda_input("every input", *input, device);
  }
  if (x_logvar.has_value()) {
    TORCH_CHECK(x_logvar->dim() == 3, "fastvae_native::elbo: x_logvar must be [Sl, Bl, Dl]");
    const int64_t sizes[3] = {samples, batch, features};
    for (int dim = 0; dim < 3; ++dim) {
      TORCH_CHECK(x_logvar->size(dim) == 1 || x_logvar->size(dim) == sizes[dim],
                  "fastvae_native::elbo: x_logvar ", x_logvar->sizes(), " does not broadcast");
    }
  }
  if (prior_mu.has_value()) {
    TORCH_CHECK(prior_mu->sizes() == prior_logvar->sizes() && prior_mu->dim() == 2 &&
                    (prior_mu->size(0) == 1 || prior_mu->size(0) == batch) &&
                    prior_mu->size(1) == mu.size(1),
                "fastvae_native::elbo: priors must be [1 or B, d]");
  }
  TORCH_CHECK(beta.numel() == 1 && beta.device() == device, "fastvae_native::elbo: beta must be one element on ", device);
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->dim() == 1 && grad_scale->size(0) == batch && grad_scale->is_contiguous() &&
                    grad_scale->device() == device,
                "fastvae_native::elbo: grad_scale must be a contiguous [", batch, "] tensor on ", device);
  }
  const c10::cuda::CUDAGuard guard(device);

  const bool double_accumulation =
      x.scalar_type() == at::kDouble || x_hat.scalar_type() == at::kDouble ||
      (x_logvar.has_value() && x_logvar->scalar_type() == at::kDouble) || mu.scalar_type() == at::kDouble;
  const auto acc_options = x.options().dtype(double_accumulation ? at::kDouble : at::kFloat);
  at::Tensor loss = reduction_code == 0 ? at::empty({batch}, acc_options) : at::empty({}, acc_options);
  at::Tensor nll = at::empty({batch}, acc_options);
  at::Tensor kl = at::empty({batch}, acc_options);
  at::Tensor kl_term = at::empty({batch}, acc_options);
  std::array<at::Tensor, kInputCount> grads;
  Buffer targets[kInputCount];
  for (int i = 0; i < kInputCount; ++i) {
    TORCH_CHECK(!(needs_grad[i] && !inputs[i].has_value()),
                "fastvae_native::elbo: needs_grad[", i, "] is set for an absent input");
    grads[i] = needs_grad[i] ? at::empty_like(*inputs[i]) : at::empty({0}, x.options());
    if (needs_grad[i]) targets[i] = buffer_of(grads[i]);
  }
  // A prior or x_logvar broadcast over an empty batch still gets its (zero) gradient.
  if (batch == 0) {
    for (int i : {kXLogvar, kPriorMu, kPriorLogvar}) {
      if (needs_grad[i]) grads[i].zero_();
    }
  }
  const auto data = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? buffer_of(*t) : Buffer{};
  };
  const Buffer scale = grad_scale.has_value() ? buffer_of(*grad_scale) : Buffer{};
  const double uniform_weight = reduction_code == 1 ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : 1.0;

  const auto run = [&](auto acc_zero) {
    using acc_t = decltype(acc_zero);
    const RowWeights<acc_t> weights{scale, static_cast<acc_t>(uniform_weight)};
    NllArgs<acc_t> nll_args{samples, batch, features, data(x), data(x_hat), data(x_logvar), 1, 1, 1,
                            static_cast<acc_t>(x_logvar_const), bernoulli, weights,
                            targets[kX], targets[kXHat], targets[kXLogvar]};
    if (x_logvar.has_value()) {
      nll_args.logvar_samples = x_logvar->size(0);
      nll_args.logvar_batch = x_logvar->size(1);
      nll_args.logvar_features = x_logvar->size(2);
    }
    KlArgs<acc_t> kl_args{batch, mu.size(1), data(mu), data(logvar), data(prior_mu), data(prior_logvar),
                          !prior_mu.has_value() || prior_mu->size(0) == batch,
                          static_cast<acc_t>(free_bits), buffer_of(beta), weights,
                          targets[kMu], targets[kLogvar], targets[kPriorMu], targets[kPriorLogvar]};
    launch<acc_t>(nll_args, kl_args, beta, reduction_code, acc_options, loss, nll, kl, kl_term);
  };
  if (double_accumulation) {
    run(double(0));
  } else {
    run(float(0));
  }
  return {loss, nll, kl, kl_term, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6]};
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("elbo", &fastvae::cuda::elbo_cuda);
}
