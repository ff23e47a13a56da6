// What the CUDA loss passes share (nll.cu, kl.cu; elbo.cu runs them): the row weights and the
// passes' entry points. Every sum has a fixed order, so results are deterministic; no atomics,
// and beta and the weights are read on the device (no host sync).
#pragma once

#include "../elbo_args.h"
#include "common.cuh"

namespace fastvae {
namespace cuda {

// Weight w_b of row b in the loss whose gradient is formed.
template <typename acc_t>
struct RowWeights {
  Buffer grad_scale;  // [B], or null: every row weighs `uniform`
  acc_t uniform;
  __device__ acc_t operator()(int64_t b) const {
    return grad_scale.data ? load<acc_t>(grad_scale, b) : uniform;
  }
};

inline Buffer optional_buffer(const at::Tensor* tensor) {
  return tensor ? buffer_of(*tensor) : Buffer{};
}

// Where the gradient of input `slot` goes; null when it is not wanted. Args and Outputs: elbo's
// or iwae's.
template <typename Args, typename Outputs>
Buffer gradient_buffer(const Args& args, const Outputs& out, int slot) {
  return args.needs_grad[slot] ? buffer_of(out.grads[slot]) : Buffer{};
}

// out.nll and the gradients of x, x_hat and x_log_scale (nll.cu).
template <typename acc_t>
void launch_nll(const ElboArgs& args, const ElboOutputs& out, RowWeights<acc_t> weights,
                cudaStream_t stream);

// out.kl, out.kl_term and the latent gradients, the rows weighted beta * w_b (kl.cu).
template <typename acc_t>
void launch_kl(const ElboArgs& args, const ElboOutputs& out, RowWeights<acc_t> weights,
               cudaStream_t stream);

}  // namespace cuda
}  // namespace fastvae
