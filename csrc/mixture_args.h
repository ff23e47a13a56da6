// The mixture log-ratio ops' arguments, checks, per-call component tables and gradient
// assembly, shared by the CPU and CUDA implementations so that both accept exactly the same
// calls. Like elbo_args, compiled once (not per instruction set).
//
// The kernels stream over components in the padded, transposed layout of MixtureComponents:
// component k's values for latent dim j sit at [j, k], so consecutive components are adjacent
// (a CPU vector or a warp covers several components at once), and the component count is padded
// to a multiple of kComponentAlign with components that contribute exactly nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace fastvae {

// Multiple the component count is padded to: the widest CPU vector (16 float32 lanes).
constexpr int64_t kComponentAlign = 16;

using MixtureForward = std::tuple<at::Tensor, at::Tensor>;
using MixtureGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                at::Tensor>;
using MixtureNeeds = std::array<bool, 6>;

// The checked inputs: z [S, B, d]; mu, logvar [B, d]; means, logvars [K, d]; logits [K].
struct MixtureArgs {
  const at::Tensor *z, *mu, *logvar, *means, *logvars, *logits;
  int64_t samples, batch, latent, components;  // S, B, d, K
  c10::ScalarType accumulation;
};

// What every row reads about the components, formed once per call (K×d work), in the
// accumulation dtype. Padding components have mean 0, inverse variance 0 and offset −inf:
// their term logits_k + c_k is −inf, so their weight and responsibility are exactly 0.
struct MixtureComponents {
  int64_t padded;         // K rounded up to kComponentAlign
  at::Tensor means_t;     // [d, padded] the means, transposed
  at::Tensor inv_var_t;   // [d, padded] e^−logvars, transposed
  at::Tensor means;       // [K, d] the means (the CUDA z-gradient loop reads a component's row)
  at::Tensor inv_var;     // [K, d] e^−logvars
  at::Tensor offsets;     // [padded] logits_k − ½Σ_d logvars_k: c_k's constant, with the logit
  at::Tensor log_norm;    // 0-dim logsumexp(logits): log p's normaliser
  at::Tensor weights;     // [K] softmax(logits), for the logits' gradient
};

// A device's kernels for one accumulation dtype. Forward: fill log_ratio and log_prior_sum
// ([S, B]). Backward: fill the wanted gradients (allocated, the others empty) from grad and
// log_prior_sum ([S, B], contiguous, in the accumulation dtype).
using MixtureForwardKernel = void (*)(const MixtureArgs& args, const MixtureComponents& components,
                                      at::Tensor& log_ratio, at::Tensor& log_prior_sum);
using MixtureBackwardKernel = void (*)(const MixtureArgs& args,
                                       const MixtureComponents& components,
                                       const at::Tensor& grad, const at::Tensor& log_prior_sum,
                                       const MixtureNeeds& needs,
                                       std::array<at::Tensor, 6>& grads);

// The ops as a device registers them: the checks (errors name the argument), the outputs and
// the component tables here, then `kernels[0]` for float32 accumulation or `kernels[1]` for
// float64.
MixtureForward mixture_forward(const at::Tensor& z, const at::Tensor& mu,
                               const at::Tensor& logvar, const at::Tensor& means,
                               const at::Tensor& logvars, const at::Tensor& logits,
                               const std::array<MixtureForwardKernel, 2>& kernels);
MixtureGrads mixture_backward(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& mu,
                              const at::Tensor& logvar, const at::Tensor& means,
                              const at::Tensor& logvars, const at::Tensor& logits,
                              const at::Tensor& log_prior_sum, const MixtureNeeds& needs,
                              const std::array<MixtureBackwardKernel, 2>& kernels);

// Columns of one row of the component-gradient partial sums: ∂means [d, padded], ∂logvars
// [d, padded] (transposed like the tables), −Σ g·r_k [padded], and Σ g.
inline int64_t partial_columns(const MixtureArgs& args, const MixtureComponents& components) {
  return (2 * args.latent + 1) * components.padded + 1;
}

// Writes the wanted component gradients (slots 3-5) from the partial sums totalled over all rows
// (`totals`, partial_columns(...) elements in the accumulation dtype).
void store_component_grads(const MixtureArgs& args, const MixtureComponents& components,
                           const at::Tensor& totals, std::array<at::Tensor, 6>& grads);

}  // namespace fastvae
