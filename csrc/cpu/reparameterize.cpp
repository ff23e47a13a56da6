// Reparameterised sampling on the CPU: z = mu + exp(½·logvar)·ε with ε from the noise stream,
// and its backward, which regenerates ε from the seed instead of storing it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "../arg_checks.h"
#include "../elementwise.h"
#include "loops.h"
#include "noise.h"
#include "kernels.h"
#include "tiles.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

// Noise blocks per parallel task, so small calls run on one thread.
constexpr int64_t kNoiseBlocksPerTask = 8;

uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.is_cpu(),
              "fastvae_native: seed must be a 0-dim int64 CPU tensor, got ", seed.sizes(), " ",
              seed.scalar_type(), " on ", seed.device());
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
}

// The kernels read every tensor in its flat order: any shape, if contiguous.
void check_flat(const char* name, const at::Tensor& tensor) {
  TORCH_CHECK(tensor.is_contiguous() && tensor.is_floating_point(), "fastvae_native: ", name,
              " must be a contiguous floating tensor, got ", tensor.sizes(), " ",
              tensor.scalar_type());
}

// Runs visit(i, eps, n) over the whole stream of `numel` normals, in parallel, in pieces that
// stay within one row of length `row`.
template <typename Visit>
void parallel_noise(uint64_t seed, int64_t numel, int64_t row, const Visit& visit) {
  const int64_t calls = philox_quarter(numel);
  const int64_t blocks = (calls + kNoiseBlock - 1) / kNoiseBlock;
  at::parallel_for(0, blocks, kNoiseBlocksPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kNoiseBlock;
      for_each_noise_piece(seed, numel, row, first, std::min(kNoiseBlock, calls - first), visit);
    }
  });
}

template <typename acc_t>
void sample(const at::Tensor& mu, const at::Tensor& logvar, uint64_t seed, at::Tensor& z) {
  const int64_t latent = mu.numel();
  const c10::ScalarType type = mu.scalar_type();
  const void* mu_data = mu.const_data_ptr();
  const void* logvar_data = logvar.const_data_ptr();
  void* z_data = z.mutable_data_ptr();
  parallel_noise(seed, z.numel(), latent, [&](int64_t i, const float* noise, int64_t n) {
    alignas(64) acc_t mu_buffer[kNoiseBlock], logvar_buffer[kNoiseBlock];
    alignas(64) acc_t eps_buffer[kNoiseBlock], z_buffer[kNoiseBlock];
    const int64_t k = i % latent;
    const acc_t* mu_tile = load_tile(advance(mu_data, type, k), type, n, mu_buffer);
    const acc_t* logvar_tile = load_tile(advance(logvar_data, type, k), type, n, logvar_buffer);
    const acc_t* eps = load_tile(noise, at::kFloat, n, eps_buffer);
    acc_t* z_tile = tile_target(advance(z_data, type, i), type, z_buffer);
    vectorized_for<acc_t>(n, [&](int64_t e, auto width) {
      using T = typename decltype(width)::type;
      store_as(reparameterized_sample(load_as<T>(mu_tile + e), load_as<T>(logvar_tile + e),
                                      load_as<T>(eps + e)),
               z_tile + e);
    });
    store_tile(z_tile, n, advance(z_data, type, i), type);
  });
}

// ½·exp(½·logvar)·Σ_s g·ε over a tile, in place in `product_sum`.
template <typename acc_t>
void scale_by_half_sigma(int64_t n, const acc_t* logvar, acc_t* product_sum) {
  vectorized_for<acc_t>(n, [&](int64_t e, auto width) {
    using T = typename decltype(width)::type;
    const T half_sigma = constant<T>(0.5) * MathOps<T>::exp(constant<T>(0.5) * load_as<T>(logvar + e));
    store_as(load_as<T>(product_sum + e) * half_sigma, product_sum + e);
  });
}

// grad_mu[k] = Σ_s g[s,k];  grad_logvar[k] = ½·exp(½·logvar[k])·Σ_s g[s,k]·ε[s,k].
// With one sample each noise piece gives its gradients directly. With more, the products g·ε
// are formed per noise block, then summed over s in order per k, so the result does not
// depend on how the blocks were spread over threads.
// The untyped views sample_backward's parts work on; grad_mu / grad_logvar null when not wanted.
struct BackwardProblem {
  const void* grad;
  c10::ScalarType grad_type;
  const void* logvar;
  c10::ScalarType type;  // logvar's, and the gradients'
  void* grad_mu;
  void* grad_logvar;
  int64_t samples, latent, numel;
  uint64_t seed;
};

// One sample, grad_logvar not wanted: grad_mu is grad_z itself, and no noise is needed.
template <typename acc_t>
void copy_grad_mu(const BackwardProblem& p) {
  at::parallel_for(0, p.latent, kTile, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t grad_buffer[kTile];
    for (int64_t k0 = begin; k0 < end; k0 += kTile) {
      const int64_t n = std::min(kTile, end - k0);
      store_tile(load_tile(advance(p.grad, p.grad_type, k0), p.grad_type, n, grad_buffer), n,
                 advance(p.grad_mu, p.type, k0), p.type);
    }
  });
}

// products[i] = g[i]·ε[i] for the n elements from `i` (noise as parallel_noise hands it out).
template <typename acc_t>
const acc_t* noise_products(const BackwardProblem& p, int64_t i, const float* noise, int64_t n,
                            acc_t* grad_buffer, acc_t* eps_buffer, acc_t* products) {
  const acc_t* grad = load_tile(advance(p.grad, p.grad_type, i), p.grad_type, n, grad_buffer);
  const acc_t* eps = load_tile(noise, at::kFloat, n, eps_buffer);
  vectorized_for<acc_t>(n, [&](int64_t e, auto width) {
    using T = typename decltype(width)::type;
    store_as(load_as<T>(grad + e) * load_as<T>(eps + e), products + e);
  });
  return grad;
}

// One sample: each noise piece gives its gradients directly.
template <typename acc_t>
void single_sample_backward(const BackwardProblem& p) {
  parallel_noise(p.seed, p.numel, p.latent, [&](int64_t k, const float* noise, int64_t n) {
    alignas(64) acc_t grad_buffer[kNoiseBlock], eps_buffer[kNoiseBlock];
    alignas(64) acc_t logvar_buffer[kNoiseBlock], product[kNoiseBlock];
    const acc_t* grad = noise_products(p, k, noise, n, grad_buffer, eps_buffer, product);
    if (p.grad_mu) store_tile(grad, n, advance(p.grad_mu, p.type, k), p.type);
    scale_by_half_sigma(n, load_tile(advance(p.logvar, p.type, k), p.type, n, logvar_buffer), product);
    store_tile(product, n, advance(p.grad_logvar, p.type, k), p.type);
  });
}

// Several samples: Σ_s over [samples, latent] per k, in sample order, of grad_z (into grad_mu)
// and of the products g·ε (into grad_logvar, then scaled by ½·exp(½·logvar)).
template <typename acc_t>
void sum_over_samples(const BackwardProblem& p, const acc_t* products) {
  at::parallel_for(0, p.latent, kTile, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t mu_sum[kTile], product_sum[kTile], grad_buffer[kTile], logvar_buffer[kTile];
    for (int64_t k0 = begin; k0 < end; k0 += kTile) {
      const int64_t n = std::min(kTile, end - k0);
      std::fill(mu_sum, mu_sum + n, acc_t(0));
      std::fill(product_sum, product_sum + n, acc_t(0));
      for (int64_t s = 0; s < p.samples; ++s) {
        const int64_t row = s * p.latent + k0;
        if (p.grad_mu) {
          const acc_t* grad = load_tile(advance(p.grad, p.grad_type, row), p.grad_type, n, grad_buffer);
          for (int64_t e = 0; e < n; ++e) mu_sum[e] += grad[e];
        }
        if (products) {
          for (int64_t e = 0; e < n; ++e) product_sum[e] += products[row + e];
        }
      }
      if (p.grad_mu) store_tile(mu_sum, n, advance(p.grad_mu, p.type, k0), p.type);
      if (products) {
        scale_by_half_sigma(n, load_tile(advance(p.logvar, p.type, k0), p.type, n, logvar_buffer),
                            product_sum);
        store_tile(product_sum, n, advance(p.grad_logvar, p.type, k0), p.type);
      }
    }
  });
}

// grad_mu[k] = Σ_s g[s,k];  grad_logvar[k] = ½·exp(½·logvar[k])·Σ_s g[s,k]·ε[s,k].
// With one sample each noise piece gives its gradients directly. With more, the products g·ε
// are formed per noise block, then summed over s in order per k, so the result does not
// depend on how the blocks were spread over threads.
template <typename acc_t>
void sample_backward(const at::Tensor& grad_z, const at::Tensor& logvar, uint64_t seed,
                     int64_t samples, at::Tensor& grad_mu, at::Tensor& grad_logvar) {
  const BackwardProblem p{grad_z.const_data_ptr(), grad_z.scalar_type(), logvar.const_data_ptr(),
                          logvar.scalar_type(),
                          grad_mu.defined() ? grad_mu.mutable_data_ptr() : nullptr,
                          grad_logvar.defined() ? grad_logvar.mutable_data_ptr() : nullptr,
                          samples, logvar.numel(), grad_z.numel(), seed};
  if (samples == 1 && !p.grad_logvar) {
    if (p.grad_mu) copy_grad_mu<acc_t>(p);
  } else if (samples == 1) {
    single_sample_backward<acc_t>(p);
  } else if (!p.grad_logvar) {
    sum_over_samples<acc_t>(p, nullptr);
  } else {
    at::Tensor products = at::empty({p.numel}, grad_z.options().dtype(scalar_type_of<acc_t>()));
    acc_t* product_data = products.mutable_data_ptr<acc_t>();
    parallel_noise(seed, p.numel, p.latent, [&](int64_t i, const float* noise, int64_t n) {
      alignas(64) acc_t grad_buffer[kNoiseBlock], eps_buffer[kNoiseBlock];
      noise_products(p, i, noise, n, grad_buffer, eps_buffer, product_data + i);
    });
    sum_over_samples<acc_t>(p, products.const_data_ptr<acc_t>());
  }
}

}  // namespace

at::Tensor reparameterize_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                              const at::Tensor& seed, int64_t n_samples) {
  check_flat("mu", mu);
  check_flat("logvar", logvar);
  TORCH_CHECK(mu.sizes() == logvar.sizes() && mu.scalar_type() == logvar.scalar_type(),
              "fastvae_native: mu and logvar must match in shape and dtype, got ", mu.sizes(),
              " ", mu.scalar_type(), " and ", logvar.sizes(), " ", logvar.scalar_type());
  TORCH_CHECK(n_samples >= 1, "fastvae_native: n_samples must be >= 1, got ", n_samples);
  const uint64_t seed_value = read_seed(seed);
  at::Tensor z = at::empty(sample_shape(mu, n_samples), mu.options());
  if (mu.scalar_type() == at::kDouble) {
    sample<double>(mu, logvar, seed_value, z);
  } else {
    sample<float>(mu, logvar, seed_value, z);
  }
  return z;
}

std::tuple<at::Tensor, at::Tensor> reparameterize_backward_cpu(
    const at::Tensor& grad_z, const at::Tensor& logvar, const at::Tensor& seed, int64_t n_samples,
    bool need_mu, bool need_logvar) {
  check_flat("grad_z", grad_z);
  check_flat("logvar", logvar);
  TORCH_CHECK(n_samples >= 1 && grad_z.numel() == n_samples * logvar.numel(),
              "fastvae_native: grad_z must have n_samples * logvar.numel() elements, got ",
              grad_z.numel(), " for n_samples=", n_samples, " and logvar ", logvar.sizes());
  const uint64_t seed_value = read_seed(seed);
  at::Tensor grad_mu = gradient_output(need_mu, logvar, logvar.options());
  at::Tensor grad_logvar = gradient_output(need_logvar, logvar, logvar.options());
  at::Tensor mu_target = need_mu ? grad_mu : at::Tensor();
  at::Tensor logvar_target = need_logvar ? grad_logvar : at::Tensor();
  if (logvar.scalar_type() == at::kDouble) {
    sample_backward<double>(grad_z, logvar, seed_value, n_samples, mu_target, logvar_target);
  } else {
    sample_backward<float>(grad_z, logvar, seed_value, n_samples, mu_target, logvar_target);
  }
  return {grad_mu, grad_logvar};
}

// The tests' noise-stream probe: out[j][c] is normal j of the Philox call first_call + c, from
// the same philox_normal_block the kernels above draw their noise from.
at::Tensor philox_normals_cpu(const at::Tensor& seed, int64_t first_call, int64_t count) {
  TORCH_CHECK(first_call >= 0 && count >= 0 && first_call <= INT64_MAX - count,
              "fastvae_native: _philox_normals needs 0 <= first_call and first_call + count <= "
              "2**63 - 1, got first_call=", first_call, " count=", count);
  const uint64_t seed_value = read_seed(seed);
  at::Tensor out = at::empty({4, count}, seed.options().dtype(at::kFloat));
  float* data = out.mutable_data_ptr<float>();
  alignas(64) float normals[4][kNoiseBlock];
  for (int64_t done = 0; done < count; done += kNoiseBlock) {
    const int64_t n = std::min(kNoiseBlock, count - done);
    philox_normal_block(seed_value, first_call + done, n, normals);
    for (int j = 0; j < 4; ++j) std::copy(normals[j], normals[j] + n, data + j * count + done);
  }
  return out;
}

FASTVAE_NAMESPACE_END
