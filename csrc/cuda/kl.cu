// The KL pass on CUDA: one block per datapoint row for kl, kl_term and the per-row latent
// gradients; sums across rows (the free-bits batch mean, a shared prior's gradients) by a thread
// per latent dim looping over rows in order. With a KL capacity C, kl_term[b] = |KL_fb[b] - C|
// and row b's gradients take sign(KL_fb[b] - C), known only once the row is summed: a pre-pass
// of the row kernel without gradient targets forms KL_fb first.
#include "../elementwise.h"
#include "elbo.cuh"

namespace fastvae {
namespace cuda {
namespace {

template <typename acc_t>
struct KlArgs {
  int64_t batch, latent;
  Buffer mu, logvar, prior_mu, prior_logvar;  // prior null: the standard normal
  bool prior_per_row;
  acc_t free_bits;
  Buffer beta;
  RowWeights<acc_t> weights;
  Buffer grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar;
  Buffer capacity;               // C, or null: no capacity
  const acc_t* kl_fb = nullptr;  // [B] KL_fb from the capacity pre-pass; null: unsigned weights

  __host__ bool wants_gradients() const {
    return grad_mu.data || grad_logvar.data || grad_prior_mu.data || grad_prior_logvar.data;
  }

  // beta * w_b, times sign(KL_fb[b] - C) once the pre-pass has formed KL_fb.
  __device__ acc_t kl_weight(int64_t b) const {
    const acc_t weight = load<acc_t>(beta, 0) * weights(b);
    if (!kl_fb) return weight;
    return weight * MathOps<acc_t>::sign(kl_fb[b] - load<acc_t>(capacity, 0));
  }

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
__device__ void store_latent_grads(const KlArgs<acc_t>& a, int64_t b, int64_t j, acc_t scale,
                                   acc_t grad_mu, acc_t grad_logvar, acc_t grad_prior_logvar) {
  const int64_t index = b * a.latent + j;
  if (a.grad_mu.data) store(a.grad_mu, index, grad_mu * scale);
  if (a.grad_logvar.data) store(a.grad_logvar, index, grad_logvar * scale);
  if (!a.prior_per_row) return;  // a shared prior's gradients: prior_column_grad_kernel
  if (a.grad_prior_mu.data) store(a.grad_prior_mu, index, -grad_mu * scale);
  if (a.grad_prior_logvar.data) store(a.grad_prior_logvar, index, grad_prior_logvar * scale);
}

template <typename acc_t>
__global__ void kl_rows_kernel(KlArgs<acc_t> a, const acc_t* active, acc_t* kl_rows,
                               acc_t* kl_term_rows) {
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
      store_latent_grads(a, b, j, scale, grad_mu, grad_logvar, grad_prior_logvar);
    }
    const acc_t kl_total = block_sum(kl_sum);
    const acc_t active_total = block_sum(active_sum);
    const acc_t inactive_total = block_sum(inactive_count);
    if (threadIdx.x == 0) {
      kl_rows[b] = kl_total;
      const acc_t kl_fb = active ? active_total + inactive_total * a.free_bits : kl_total;
      kl_term_rows[b] =
          a.capacity.data ? MathOps<acc_t>::abs(kl_fb - load<acc_t>(a.capacity, 0)) : kl_fb;
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

template <typename acc_t>
KlArgs<acc_t> kl_args(const ElboArgs& args, const ElboOutputs& out, RowWeights<acc_t> weights) {
  return {args.batch, args.latent, buffer_of(*args.mu), buffer_of(*args.logvar),
          optional_buffer(args.prior_mu), optional_buffer(args.prior_logvar),
          !args.prior_mu || args.prior_mu->size(0) == args.batch,
          static_cast<acc_t>(args.free_bits), buffer_of(*args.beta), weights,
          gradient_buffer(args, out, kMu), gradient_buffer(args, out, kLogvar),
          gradient_buffer(args, out, kPriorMu), gradient_buffer(args, out, kPriorLogvar),
          optional_buffer(args.capacity)};
}

// The capacity pre-pass: KL_fb per row from the row kernel run without gradient targets and
// without the capacity (out.kl is written again, identically, by the pass proper).
template <typename acc_t>
at::Tensor kl_fb_rows(KlArgs<acc_t> a, const acc_t* active, const ElboOutputs& out,
                      cudaStream_t stream) {
  a.grad_mu = a.grad_logvar = a.grad_prior_mu = a.grad_prior_logvar = a.capacity = Buffer{};
  at::Tensor kl_fb = at::empty({a.batch}, out.kl.options());
  kl_rows_kernel<<<blocks_for(a.batch, 1), kThreads, 0, stream>>>(
      a, active, out.kl.mutable_data_ptr<acc_t>(), kl_fb.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return kl_fb;
}

}  // namespace

template <typename acc_t>
void launch_kl(const ElboArgs& args, const ElboOutputs& out, RowWeights<acc_t> weights,
               cudaStream_t stream) {
  KlArgs<acc_t> a = kl_args(args, out, weights);
  at::Tensor active;
  if (args.free_bits > 0 && a.latent > 0) {
    active = at::empty({a.latent}, out.kl.options());
    free_bits_kernel<<<blocks_for(a.latent), kThreads, 0, stream>>>(a, active.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const acc_t* active_data = active.defined() ? active.const_data_ptr<acc_t>() : nullptr;
  at::Tensor kl_fb;  // without gradients to form, the sign is not needed
  if (a.capacity.data && a.wants_gradients() && a.batch > 0) {
    kl_fb = kl_fb_rows(a, active_data, out, stream);
    a.kl_fb = kl_fb.const_data_ptr<acc_t>();
  }
  if (a.batch > 0) {
    // With free bits and d = 0 there is no active mask, and kl_term = kl = 0 as it should be.
    kl_rows_kernel<<<blocks_for(a.batch, 1), kThreads, 0, stream>>>(
        a, active_data, out.kl.mutable_data_ptr<acc_t>(), out.kl_term.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!a.prior_per_row && (a.grad_prior_mu.data || a.grad_prior_logvar.data) && a.latent > 0) {
    prior_column_grad_kernel<<<blocks_for(a.latent), kThreads, 0, stream>>>(a, active_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template void launch_kl<float>(const ElboArgs&, const ElboOutputs&, RowWeights<float>, cudaStream_t);
template void launch_kl<double>(const ElboArgs&, const ElboOutputs&, RowWeights<double>, cudaStream_t);

}  // namespace cuda
}  // namespace fastvae
