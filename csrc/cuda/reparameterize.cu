// Reparameterised sampling on CUDA: one thread per Philox call writes its four normals' samples
// to the four quarters of z; backward regenerates ε the same way. The seed is read on the device.
#include <torch/library.h>

#include "../arg_checks.h"
#include "../elementwise.h"
#include "../philox.h"
#include "common.cuh"

namespace fastvae {
namespace cuda {
namespace {

__device__ __forceinline__ void normals_at(const int64_t* seed, int64_t call, float (&normals)[4]) {
  uint32_t words[4];
  philox4x32_10(static_cast<uint64_t>(*seed), static_cast<uint64_t>(call), words[0], words[1],
                words[2], words[3]);
  box_muller(philox_uniform(words[0]), philox_uniform(words[1]), normals[0], normals[1]);
  box_muller(philox_uniform(words[2]), philox_uniform(words[3]), normals[2], normals[3]);
}

// The stream of docs/design.md §3 over `numel` elements: each thread's Philox call `call` yields the
// normals of elements j * quarter + call (j = 0..3), passed to `visit(i, eps)` in stream order.
template <typename Visit>
__device__ __forceinline__ void for_each_normal(const int64_t* seed, int64_t numel, Visit visit) {
  const int64_t quarter = philox_quarter(numel);
  for (int64_t call = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; call < quarter;
       call += int64_t(gridDim.x) * blockDim.x) {
    float normals[4];
    normals_at(seed, call, normals);
    for (int j = 0; j < 4; ++j) {
      const int64_t i = j * quarter + call;
      if (i >= numel) break;
      visit(i, normals[j]);
    }
  }
}

template <typename acc_t>
__global__ void sample_kernel(Buffer mu, Buffer logvar, const int64_t* seed, int64_t numel,
                              int64_t latent, Buffer z) {
  for_each_normal(seed, numel, [&](int64_t i, float eps) {
    const int64_t k = i % latent;
    store(z, i, reparameterized_sample(load<acc_t>(mu, k), load<acc_t>(logvar, k),
                                       static_cast<acc_t>(eps)));
  });
}

template <typename acc_t>
__global__ void noise_product_kernel(Buffer grad_z, const int64_t* seed, int64_t numel,
                                     acc_t* products) {
  for_each_normal(seed, numel, [&](int64_t i, float eps) {
    products[i] = load<acc_t>(grad_z, i) * static_cast<acc_t>(eps);
  });
}

// Sums over samples in order for each latent element: deterministic.
template <typename acc_t>
__global__ void sample_grad_kernel(Buffer grad_z, const acc_t* products, Buffer logvar,
                                   int64_t samples, int64_t latent, Buffer grad_mu,
                                   Buffer grad_logvar) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < latent;
       k += int64_t(gridDim.x) * blockDim.x) {
    acc_t mu_sum = 0, product_sum = 0;
    for (int64_t s = 0; s < samples; ++s) {
      if (grad_mu.data) mu_sum += load<acc_t>(grad_z, s * latent + k);
      if (products) product_sum += products[s * latent + k];
    }
    if (grad_mu.data) store(grad_mu, k, mu_sum);
    if (products) {
      const acc_t half_sigma = acc_t(0.5) * MathOps<acc_t>::exp(acc_t(0.5) * load<acc_t>(logvar, k));
      store(grad_logvar, k, product_sum * half_sigma);
    }
  }
}

void check_seed(const at::Tensor& seed, const at::Device& device) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device() == device,
              "fastvae_native: seed must be a 0-dim int64 tensor on ", device);
}

at::Tensor reparameterize_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                               const at::Tensor& seed, int64_t n_samples) {
  TORCH_CHECK(mu.sizes() == logvar.sizes() && mu.scalar_type() == logvar.scalar_type(),
              "fastvae_native: mu and logvar must be of one shape and dtype");
  TORCH_CHECK(n_samples >= 1, "fastvae_native: n_samples must be >= 1");
  check_cuda_input("mu", mu, mu.device());
  check_cuda_input("logvar", logvar, mu.device());
  check_seed(seed, mu.device());
  const c10::cuda::CUDAGuard guard(mu.device());
  at::Tensor z = at::empty(sample_shape(mu, n_samples), mu.options());
  const int64_t calls = philox_quarter(z.numel());
  if (calls == 0) return z;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* seed_data = seed.const_data_ptr<int64_t>();
  if (mu.scalar_type() == at::kDouble) {
    sample_kernel<double><<<blocks_for(calls), kThreads, 0, stream>>>(
        buffer_of(mu), buffer_of(logvar), seed_data, z.numel(), mu.numel(), buffer_of(z));
  } else {
    sample_kernel<float><<<blocks_for(calls), kThreads, 0, stream>>>(
        buffer_of(mu), buffer_of(logvar), seed_data, z.numel(), mu.numel(), buffer_of(z));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return z;
}

template <typename acc_t>
void sample_backward(const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed,
                     int64_t samples, const Buffer& grad_mu, const Buffer& grad_logvar) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor products;
  if (grad_logvar.data) {
    products = at::empty({grad_z.numel()}, grad_z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    noise_product_kernel<acc_t><<<blocks_for(philox_quarter(grad_z.numel())), kThreads, 0, stream>>>(
        buffer_of(grad_z), seed.const_data_ptr<int64_t>(), grad_z.numel(),
        products.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sample_grad_kernel<acc_t><<<blocks_for(logvar.numel()), kThreads, 0, stream>>>(
      buffer_of(grad_z), grad_logvar.data ? products.const_data_ptr<acc_t>() : nullptr,
      buffer_of(logvar), samples, logvar.numel(), grad_mu, grad_logvar);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cuda(
    const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed, int64_t n_samples,
    bool need_mu, bool need_logvar) {
  TORCH_CHECK(n_samples >= 1 && grad_z.numel() == n_samples * logvar.numel(),
              "fastvae_native: grad_z must have n_samples * logvar.numel() elements");
  check_cuda_input("grad_z", grad_z, logvar.device());
  check_cuda_input("logvar", logvar, logvar.device());
  check_seed(seed, logvar.device());
  const c10::cuda::CUDAGuard guard(logvar.device());
  at::Tensor grad_mu = gradient_output(need_mu, logvar, logvar.options());
  at::Tensor grad_logvar = gradient_output(need_logvar, logvar, logvar.options());
  if (logvar.numel() == 0) return {grad_mu, grad_logvar};
  const Buffer mu_target = need_mu ? buffer_of(grad_mu) : Buffer{};
  const Buffer logvar_target = need_logvar ? buffer_of(grad_logvar) : Buffer{};
  if (logvar.scalar_type() == at::kDouble) {
    sample_backward<double>(grad_z, logvar, seed, n_samples, mu_target, logvar_target);
  } else {
    sample_backward<float>(grad_z, logvar, seed, n_samples, mu_target, logvar_target);
  }
  return {grad_mu, grad_logvar};
}

// The tests' noise-stream probe (registration.cpp): out[j][c] = normal j of call first_call + c.
__global__ void philox_normals_kernel(const int64_t* seed, int64_t first_call, int64_t count,
                                      float* out) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < count;
       c += int64_t(gridDim.x) * blockDim.x) {
    float normals[4];
    normals_at(seed, first_call + c, normals);
    for (int j = 0; j < 4; ++j) out[j * count + c] = normals[j];
  }
}

at::Tensor philox_normals_cuda(const at::Tensor& seed, int64_t first_call, int64_t count) {
  TORCH_CHECK(first_call >= 0 && count >= 0 && first_call <= INT64_MAX - count,
              "fastvae_native: _philox_normals needs 0 <= first_call and first_call + count <= "
              "2**63 - 1");
  check_seed(seed, seed.device());
  const c10::cuda::CUDAGuard guard(seed.device());
  at::Tensor out = at::empty({4, count}, seed.options().dtype(at::kFloat));
  if (count == 0) return out;
  philox_normals_kernel<<<blocks_for(count), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      seed.const_data_ptr<int64_t>(), first_call, count, out.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, CUDA, m) {
  m.impl("reparameterize", &fastvae::cuda::reparameterize_cuda);
  m.impl("reparameterize_backward", &fastvae::cuda::reparameterize_backward_cuda);
  m.impl("_philox_normals", &fastvae::cuda::philox_normals_cuda);
}
