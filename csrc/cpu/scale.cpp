// scale_ on the CPU: every gradient element g becomes g·u (u the upstream gradient), in float32
// (float64 for float64 g) and rounded once to g's dtype. Where u == 1 nothing is read or
// written: for a 0-dim u the whole call, for a [B] u that row.
#include <ATen/Parallel.h>

#include "kernels.h"
#include "loops.h"
#include "tiles.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

// Elements of work below which a parallel task is not worth starting.
constexpr int64_t kElementsPerTask = 1 << 15;

template <typename acc_t>
acc_t read_element(const at::Tensor& tensor, int64_t index) {
  acc_t converted;
  return *load_tile(advance(tensor.const_data_ptr(), tensor.scalar_type(), index),
                    tensor.scalar_type(), 1, &converted);
}

// data[0, n) *= factor, a tile at a time (widened to acc_t where data is 16-bit).
template <typename acc_t>
void scale_span(void* data, c10::ScalarType type, int64_t n, acc_t factor) {
  alignas(64) acc_t buffer[kTile];
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t count = std::min(kTile, n - t0);
    void* tile = advance(data, type, t0);
    const acc_t* in = load_tile(tile, type, count, buffer);
    acc_t* out = tile_target(tile, type, buffer);
    vectorized_for<acc_t>(count, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      store_as(load_as<T>(in + i) * T(factor), out + i);
    });
    store_tile(out, count, tile, type);
  }
}

template <typename acc_t>
void scale_whole(const at::Tensor& grad, acc_t factor) {
  at::parallel_for(0, grad.numel(), kElementsPerTask, [&](int64_t begin, int64_t end) {
    scale_span(advance(grad.mutable_data_ptr(), grad.scalar_type(), begin), grad.scalar_type(),
               end - begin, factor);
  });
}

// grad [L, B, T]: row (l, b) scaled by upstream[b], skipped where that is one. The test is made
// in acc_t, the type the product is formed in: a factor that rounds to 1 would leave g as it is.
template <typename acc_t>
void scale_rows(const at::Tensor& grad, const at::Tensor& upstream) {
  const int64_t batch = grad.size(1), length = grad.size(2);
  const int64_t grain = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, length));
  at::parallel_for(0, grad.size(0) * batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t factor = read_element<acc_t>(upstream, row % batch);
      if (factor == acc_t(1)) continue;
      scale_span(advance(grad.mutable_data_ptr(), grad.scalar_type(), row * length),
                 grad.scalar_type(), length, factor);
    }
  });
}

template <typename acc_t>
void scale_grad(const at::Tensor& grad, const at::Tensor& upstream) {
  if (upstream.dim() == 1) return scale_rows<acc_t>(grad, upstream);
  const acc_t factor = read_element<acc_t>(upstream, 0);
  if (factor != acc_t(1)) scale_whole<acc_t>(grad, factor);
}

}  // namespace

void scale_cpu(at::TensorList grads, const at::Tensor& upstream) {
  check_scale_args(grads, upstream);
  for (const at::Tensor& grad : grads) {
    if (grad.scalar_type() == at::kDouble) {
      scale_grad<double>(grad, upstream);
    } else {
      scale_grad<float>(grad, upstream);
    }
  }
}

FASTVAE_NAMESPACE_END
