// The argument checks and gradient allocation the ops share (see arg_checks.h).
#include "arg_checks.h"

#include <ATen/ATen.h>

namespace fastvae {

bool supported_dtype(c10::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

void check_tensor(const char* op, const char* name, const at::Tensor& tensor, int64_t dims,
                  const at::Device& device) {
  TORCH_CHECK(tensor.dim() == dims && tensor.is_contiguous() && tensor.device() == device &&
                  supported_dtype(tensor.scalar_type()),
              op, name, " must be a contiguous ", dims,
              "-D float32, float64, float16 or bfloat16 tensor on ", device, ", got ",
              tensor.sizes(), " ", tensor.scalar_type(), " on ", tensor.device());
}

void check_sizes(const char* op, const char* name, const at::Tensor& tensor,
                 std::initializer_list<int64_t> sizes, bool broadcast) {
  int64_t dim = 0;
  for (const int64_t size : sizes) {
    const int64_t actual = tensor.size(dim);
    TORCH_CHECK(actual == size || (broadcast && actual == 1), op, name, " has size ", actual,
                " in dim ", dim, ", expected ", size, broadcast ? " or 1" : "", " (shape ",
                tensor.sizes(), ")");
    ++dim;
  }
}

void check_row_weights(const char* op, const at::Tensor* grad_scale, int64_t batch,
                       const at::Device& device) {
  if (!grad_scale) return;
  check_tensor(op, "grad_scale", *grad_scale, 1, device);
  check_sizes(op, "grad_scale", *grad_scale, {batch}, false);
}

void check_reduction(const char* op, Reduction reduction) {
  TORCH_CHECK(reduction >= Reduction::kNone && reduction <= Reduction::kSum, op,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              static_cast<int64_t>(reduction));
}

const at::Tensor* optional_pointer(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? &*tensor : nullptr;
}

std::vector<int64_t> sample_shape(const at::Tensor& mu, int64_t n_samples) {
  if (mu.dim() == 0) return {n_samples};
  std::vector<int64_t> shape(mu.sizes().begin(), mu.sizes().end());
  shape[0] *= n_samples;
  return shape;
}

at::Tensor gradient_output(bool needed, const at::Tensor& input, const at::TensorOptions& absent) {
  return needed ? at::empty(input.sizes(), input.options()) : at::empty({0}, absent);
}

template <size_t N>
std::array<at::Tensor, N> allocate_gradients(const std::array<const at::Tensor*, N>& inputs,
                                             const std::array<bool, N>& needs, const at::Tensor& x,
                                             int64_t batch, Likelihood likelihood,
                                             BroadcastSlots broadcast) {
  std::array<at::Tensor, N> grads;
  for (size_t slot = 0; slot < N; ++slot) {
    grads[slot] = gradient_output(needs[slot], *inputs[slot], x.options());
  }
  const auto zero = [&](int slot) {
    if (needs[slot]) grads[slot].zero_();
  };
  if (batch == 0) {
    zero(broadcast.prior_mu);
    zero(broadcast.prior_logvar);
  }
  if (batch == 0 || !uses_scale(likelihood)) zero(broadcast.log_scale);
  return grads;
}

template std::array<at::Tensor, 7> allocate_gradients<7>(
    const std::array<const at::Tensor*, 7>&, const std::array<bool, 7>&, const at::Tensor&,
    int64_t, Likelihood, BroadcastSlots);
template std::array<at::Tensor, 9> allocate_gradients<9>(
    const std::array<const at::Tensor*, 9>&, const std::array<bool, 9>&, const at::Tensor&,
    int64_t, Likelihood, BroadcastSlots);

}  // namespace fastvae
