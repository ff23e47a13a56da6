// The categorical likelihood op's arguments as one structure, with the validation and the
// output allocation that the CPU and CUDA implementations share (as elbo_args.h does for the
// loss op). The argument list is written out in C++ only here (categorical_op) and in the
// schema (registration.cpp). Built once, not per instruction set (see elbo_args.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "elbo_args.h"

namespace fastvae {

// The kernels' view of one call; tensors are borrowed for its duration, all contiguous and on
// the logits' device. Position (b, d) of sample s has the K logits
//   logits[s, b, d, :] (classes_last)   or   logits[s, b, :, d] (class-second, stride D),
// and the class index target[b, d] (int64 or uint8; outside [0, K) the position is NaN).
struct CategoricalArgs {
  const at::Tensor* logits;      // [S, B, D, K] or [S, B, K, D], floating
  const at::Tensor* target;      // [B, D]
  const at::Tensor* grad_scale;  // [B] row weights w_b; null: uniform_weight()
  bool classes_last;
  Reduction reduction;
  bool needs_grad;               // form grad_logits = w_b/S·(softmax − onehot)
  int64_t samples, batch, features, classes;  // S, B, D, K
  c10::ScalarType accumulation;  // float64 for float64 logits, else float32

  // The weight every row has in the gradient when grad_scale is null.
  double uniform_weight() const;
};

using CategoricalTuple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// loss ([B] for Reduction::kNone, else 0-dim) and nll ([B]) in the accumulation dtype;
// grad_logits like logits when needed, else an empty tensor in the logits' dtype.
struct CategoricalOutputs {
  at::Tensor loss, nll, grad_logits;
  CategoricalTuple as_tuple() const { return {loss, nll, grad_logits}; }
};

// The op's arguments as CategoricalArgs; throws with a message naming the argument unless
// the kernels accept them.
CategoricalArgs make_categorical_args(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& grad_scale,
                                      bool classes_last, int64_t reduction,
                                      std::array<bool, 1> needs_grad);

// Fresh outputs for `args`.
CategoricalOutputs allocate_categorical_outputs(const CategoricalArgs& args);

// The op as registered for one device: `Impl` receives the checked arguments.
template <CategoricalOutputs (*Impl)(const CategoricalArgs&)>
CategoricalTuple categorical_op(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& grad_scale, bool classes_last,
                                int64_t reduction, std::array<bool, 1> needs_grad) {
  return Impl(make_categorical_args(logits, target, grad_scale, classes_last, reduction,
                                    needs_grad))
      .as_tuple();
}

}  // namespace fastvae
