// The importance-weighted bound on CUDA. One block per datapoint row (grid-stride over rows).
// Sweep 1 forms each sample's log weight as one block sum (the NLL over D and the density ratio
// over d) and the row's log-sum-exp online: every thread keeps the same running maximum and sum
// in registers, so S is not bounded. When a gradient is wanted, the row's softmax weights w̃ go
// to an [S, B] scratch buffer and sweep 2 writes the row's gradients (nll.cuh's nll_columns for
// x, x_hat and θ; the latents here). Sums across rows (θ broadcast over B, a prior shared by the
// batch) are formed afterwards by a thread per output looping over rows in a fixed order, and
// the loss by one block: no atomics, so results are deterministic.
#include <torch/library.h>

#include "../elementwise.h"
#include "../iwae_args.h"
#include "nll.cuh"

namespace fastvae {
namespace cuda {
namespace {

template <typename acc_t>
struct IwaeKernelArgs {
  NllArgs<acc_t> decoder;  // x, x_hat, θ, the row weights ω_b and, in sweep 2, w̃ (normalised)
  int64_t latent;
  Buffer z, mu, logvar, prior_mu, prior_logvar;  // prior null: N(0, I)
  bool prior_per_row;
  Buffer offset;  // [S, B] added to the log weights; null: zero
  Buffer grad_z, grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar, grad_offset;
  bool dreg, wants_gradients;
  acc_t* log_weights;  // [S, B], the output
  acc_t* loss_rows;    // [B]: log S − logsumexp_s log_weights[s, b]
  acc_t* normalised;   // [S, B] scratch: w̃

  __device__ int64_t index(int64_t s, int64_t b) const { return s * decoder.batch + b; }

  // Element j of sample s of row b: the density ratio and its derivatives.
  __device__ DensityRatioTerms<acc_t> latent_terms(int64_t s, int64_t b, int64_t j) const {
    const int64_t row = b * latent + j;
    const acc_t log_variance = load<acc_t>(logvar, row);
    acc_t prior_mean = 0, prior_log_variance = 0;
    if (prior_mu.data) {
      const int64_t prior_row = (prior_per_row ? b : 0) * latent + j;
      prior_mean = load<acc_t>(prior_mu, prior_row);
      prior_log_variance = load<acc_t>(prior_logvar, prior_row);
    }
    return density_ratio_terms(load<acc_t>(z, index(s, b) * latent + j), load<acc_t>(mu, row),
                               log_variance, inverse_scale(log_variance), prior_mean,
                               prior_log_variance, inverse_scale(prior_log_variance));
  }
};

// Sample s of row b's log weight, in every thread: −Σ_D nll + Σ_d density ratio + offset.
template <typename Nll, typename acc_t>
__device__ acc_t log_weight(const IwaeKernelArgs<acc_t>& a, int64_t s, int64_t b) {
  acc_t partial = 0;
  for (int64_t j = threadIdx.x; j < a.decoder.features; j += blockDim.x) {
    partial -= a.decoder.template element<Nll>(s, b, j).nll;
  }
  for (int64_t j = threadIdx.x; j < a.latent; j += blockDim.x) partial += a.latent_terms(s, b, j).ratio;
  const acc_t total = block_sum(partial);
  return a.offset.data ? total + load<acc_t>(a.offset, a.index(s, b)) : total;
}

// Row b's latent gradients, a thread per latent dim: z's per sample, the others summed over the
// samples (a shared prior's are left to prior_column_grad_kernel).
template <typename acc_t>
__device__ void latent_gradients(const IwaeKernelArgs<acc_t>& a, int64_t b) {
  for (int64_t j = threadIdx.x; j < a.latent; j += blockDim.x) {
    acc_t sums[4] = {};  // mu, logvar, prior_mu, prior_logvar
    for (int64_t s = 0; s < a.decoder.samples; ++s) {
      const DensityRatioTerms<acc_t> t = a.latent_terms(s, b, j);
      const acc_t weight = a.decoder.weight(s, b);
      const acc_t z_weight = a.dreg ? weight * a.normalised[a.index(s, b)] : weight;
      if (a.grad_z.data) store(a.grad_z, a.index(s, b) * a.latent + j, t.grad_z * z_weight);
      sums[0] += t.grad_mu * weight;
      sums[1] += t.grad_logvar * weight;
      sums[2] += t.grad_prior_mu * weight;
      sums[3] += t.grad_prior_logvar * weight;
    }
    const int64_t row = b * a.latent + j;
    if (a.grad_mu.data) store(a.grad_mu, row, sums[0]);
    if (a.grad_logvar.data) store(a.grad_logvar, row, sums[1]);
    if (!a.prior_per_row) continue;
    if (a.grad_prior_mu.data) store(a.grad_prior_mu, row, sums[2]);
    if (a.grad_prior_logvar.data) store(a.grad_prior_logvar, row, sums[3]);
  }
}

// Sweep 2 of row b: w̃ to the scratch buffer (and −ω_b·w̃ to the offset's gradient), then the
// latents' and the decoder's gradients.
template <typename Nll, int kVec, typename acc_t>
__device__ void row_gradients(const IwaeKernelArgs<acc_t>& a, int64_t b, acc_t log_total) {
  __syncthreads();  // the row's log weights, stored by thread 0, are read below
  for (int64_t s = threadIdx.x; s < a.decoder.samples; s += blockDim.x) {
    const int64_t i = a.index(s, b);
    a.normalised[i] = MathOps<acc_t>::exp(a.log_weights[i] - log_total);
    if (a.grad_offset.data) store(a.grad_offset, i, -(a.decoder.weights(b) * a.normalised[i]));
  }
  __syncthreads();  // every thread reads the row's w̃ below
  latent_gradients(a, b);
  const NllArgs<acc_t>& d = a.decoder;
  if (!d.grad_x.data && !d.grad_x_hat.data && !d.grad_x_log_scale.data) return;
  for (int64_t j = threadIdx.x * int64_t(kVec); j < d.features; j += int64_t(blockDim.x) * kVec) {
    nll_columns<Nll, kVec>(d, b, j);
  }
}

template <typename Nll, int kVec, typename acc_t>
__global__ void iwae_rows_kernel(IwaeKernelArgs<acc_t> a) {
  for (int64_t b = blockIdx.x; b < a.decoder.batch; b += gridDim.x) {
    OnlineLogSumExp<acc_t> total;
    for (int64_t s = 0; s < a.decoder.samples; ++s) {
      const acc_t value = log_weight<Nll>(a, s, b);
      if (threadIdx.x == 0) a.log_weights[a.index(s, b)] = value;
      total.add(value);
    }
    const acc_t log_total = total.total();
    if (threadIdx.x == 0) {
      a.loss_rows[b] = MathOps<acc_t>::log(static_cast<acc_t>(a.decoder.samples)) - log_total;
    }
    if (a.wants_gradients) row_gradients<Nll, kVec>(a, b, log_total);
  }
}

// A prior shared by the batch ([1, d]): a thread per latent dim sums its gradients over the rows
// and samples in order.
template <typename acc_t>
__global__ void prior_column_grad_kernel(IwaeKernelArgs<acc_t> a) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < a.latent;
       j += int64_t(gridDim.x) * blockDim.x) {
    acc_t mu_total = 0, logvar_total = 0;
    for (int64_t b = 0; b < a.decoder.batch; ++b) {
      for (int64_t s = 0; s < a.decoder.samples; ++s) {
        const DensityRatioTerms<acc_t> t = a.latent_terms(s, b, j);
        mu_total += t.grad_prior_mu * a.decoder.weight(s, b);
        logvar_total += t.grad_prior_logvar * a.decoder.weight(s, b);
      }
    }
    if (a.grad_prior_mu.data) store(a.grad_prior_mu, j, mu_total);
    if (a.grad_prior_logvar.data) store(a.grad_prior_logvar, j, logvar_total);
  }
}

// The per-row losses summed by one block in a fixed order (divided by B for the mean).
template <typename acc_t>
__global__ void reduce_loss_kernel(const acc_t* rows, int64_t batch, Reduction reduction, acc_t* loss) {
  acc_t sum = 0;
  for (int64_t b = threadIdx.x; b < batch; b += blockDim.x) sum += rows[b];
  const acc_t total = block_sum(sum);
  if (threadIdx.x == 0) loss[0] = reduction == Reduction::kMean ? total / static_cast<acc_t>(batch) : total;
}

template <typename acc_t>
IwaeKernelArgs<acc_t> kernel_args(const IwaeArgs& args, const IwaeOutputs& out, acc_t* loss_rows,
                                  acc_t* normalised) {
  const RowWeights<acc_t> weights{optional_buffer(args.grad_scale),
                                  static_cast<acc_t>(args.uniform_weight())};
  IwaeKernelArgs<acc_t> a{nll_args(args, out, weights), args.latent, buffer_of(*args.z),
                          buffer_of(*args.mu), buffer_of(*args.logvar),
                          optional_buffer(args.prior_mu), optional_buffer(args.prior_logvar),
                          !args.prior_mu || args.prior_mu->size(0) == args.batch,
                          optional_buffer(args.log_weight_offset),
                          gradient_buffer(args, out, IwaeSlot::kZ),
                          gradient_buffer(args, out, IwaeSlot::kMu),
                          gradient_buffer(args, out, IwaeSlot::kLogvar),
                          gradient_buffer(args, out, IwaeSlot::kPriorMu),
                          gradient_buffer(args, out, IwaeSlot::kPriorLogvar),
                          gradient_buffer(args, out, IwaeSlot::kLogWeightOffset), args.dreg,
                          std::any_of(args.needs_grad.begin(), args.needs_grad.end(),
                                      [](bool need) { return need; }),
                          out.log_weights.mutable_data_ptr<acc_t>(), loss_rows, normalised};
  a.decoder.normalised = normalised;
  return a;
}

template <typename Nll, typename acc_t>
void launch_rows(const IwaeKernelArgs<acc_t>& a, const at::TensorOptions& options,
                 cudaStream_t stream) {
  if (a.decoder.batch > 0) {
    const unsigned int blocks = blocks_for(a.decoder.batch, 1);
    if (rows_aligned(a.decoder)) {
      iwae_rows_kernel<Nll, kVec><<<blocks, kThreads, 0, stream>>>(a);
    } else {
      iwae_rows_kernel<Nll, 1><<<blocks, kThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (a.decoder.grad_x_log_scale.data) launch_scale_sums<Nll>(a.decoder, options, stream);
}

template <typename acc_t>
void launch(const IwaeArgs& args, const IwaeOutputs& out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto options = out.log_weights.options();
  const bool per_row = args.reduction == Reduction::kNone;
  const at::Tensor rows = per_row ? out.loss : at::empty({args.batch}, options);
  const at::Tensor normalised = at::empty({args.samples, args.batch}, options);
  const IwaeKernelArgs<acc_t> a = kernel_args<acc_t>(args, out, rows.mutable_data_ptr<acc_t>(),
                                                     normalised.mutable_data_ptr<acc_t>());
  with_likelihood(args.likelihood, [&](auto likelihood) {
    launch_rows<decltype(likelihood)>(a, options, stream);
  });
  if (!a.prior_per_row && (a.grad_prior_mu.data || a.grad_prior_logvar.data) && a.latent > 0) {
    prior_column_grad_kernel<<<blocks_for(a.latent), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (per_row) return;
  reduce_loss_kernel<<<1, kThreads, 0, stream>>>(rows.const_data_ptr<acc_t>(), args.batch,
                                                 args.reduction, out.loss.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

IwaeOutputs iwae_cuda(const IwaeArgs& args) {
  const c10::cuda::CUDAGuard guard(args.x->device());
  IwaeOutputs out = allocate_iwae_outputs(args);
  with_accumulation(args.accumulation, [&](auto acc) { launch<decltype(acc)>(args, out); });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("iwae", &fastvae::iwae_op<&fastvae::cuda::iwae_cuda>);
}
