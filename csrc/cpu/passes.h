// What the CPU loss passes share: the split of the batch into chunks, untyped tensor views, the
// ordered reduction of per-chunk partial sums, and the passes' entry points (nll.cpp, kl.cpp;
// elbo.cpp runs them).
//
// Determinism: rows are grouped into chunks whose size depends only on the batch size. A sum
// across rows (a broadcast input's gradient, the free-bits batch mean) is formed per chunk and
// the chunk partials are added in chunk order, so the result does not depend on how
// at::parallel_for spreads the chunks over threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../elbo_args.h"
#include "tiles.h"

FASTVAE_NAMESPACE_BEGIN

// Upper bound on the chunks per pass: bounds the partial-sum buffers ([chunks, columns]).
constexpr int64_t kMaxChunks = 256;
// Elements of work below which a parallel task is not worth starting.
constexpr int64_t kElementsPerTask = 1 << 15;

struct Chunking {
  int64_t rows;   // rows per chunk
  int64_t count;  // number of chunks
  int64_t begin(int64_t chunk) const { return chunk * rows; }
  int64_t end(int64_t chunk, int64_t batch) const { return std::min(batch, (chunk + 1) * rows); }
};

inline Chunking chunk_batch(int64_t batch) {
  const int64_t rows = std::max<int64_t>(1, (batch + kMaxChunks - 1) / kMaxChunks);
  return {rows, (batch + rows - 1) / rows};
}

inline int64_t chunks_per_task(const Chunking& chunking, int64_t elements_per_row) {
  return std::max<int64_t>(
      1, kElementsPerTask / std::max<int64_t>(1, chunking.rows * elements_per_row));
}

// A tensor's data viewed untyped, with its dtype; null data when absent or not wanted.
struct Data {
  const void* data = nullptr;
  c10::ScalarType type = c10::ScalarType::Float;
};
struct MutableData {
  void* data = nullptr;
  c10::ScalarType type = c10::ScalarType::Float;
};

inline Data data_of(const at::Tensor* tensor) {
  return tensor ? Data{tensor->const_data_ptr(), tensor->scalar_type()} : Data{};
}

// Where the gradient of input `slot` goes; null when it is not wanted. Args and Outputs: elbo's
// or iwae's.
template <typename Args, typename Outputs>
MutableData gradient_of(const Args& args, const Outputs& out, int slot) {
  const at::Tensor& grad = out.grads[slot];
  return args.needs_grad[slot] ? MutableData{grad.mutable_data_ptr(), grad.scalar_type()}
                               : MutableData{};
}

// Sums `partials` ([chunks, columns], acc_t) over chunks in chunk order into `out` (columns
// elements of out.type).
template <typename acc_t>
void reduce_partials(const at::Tensor& partials, MutableData out) {
  const int64_t chunks = partials.size(0), columns = partials.size(1);
  const acc_t* data = partials.const_data_ptr<acc_t>();
  at::parallel_for(0, columns, kTile, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t total[kTile];
    for (int64_t j0 = begin; j0 < end; j0 += kTile) {
      const int64_t n = std::min(kTile, end - j0);
      std::fill(total, total + n, acc_t(0));
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const acc_t* row = data + chunk * columns + j0;
        for (int64_t e = 0; e < n; ++e) total[e] += row[e];
      }
      store_tile(total, n, advance(out.data, out.type, j0), out.type);
    }
  });
}

// A one-element tensor's value (beta, capacity) as acc_t, read from its memory: the op
// dispatches no host-read op for it.
template <typename acc_t>
acc_t read_scalar(const at::Tensor& tensor) {
  acc_t converted;
  return *load_tile(tensor.const_data_ptr(), tensor.scalar_type(), 1, &converted);
}

// w_b, the weight of row b in the loss whose gradient is formed: grad_scale[b] in acc_t when
// given, else `uniform`. A plain vector: at small batches a tensor fill and a tensor product
// cost more than the whole kernel (callers scale it in acc_t, as a tensor op would round).
template <typename acc_t>
std::vector<acc_t> row_weights(const at::Tensor* grad_scale, int64_t batch, double uniform) {
  if (!grad_scale) return std::vector<acc_t>(batch, static_cast<acc_t>(uniform));
  const at::Tensor weights = grad_scale->to(scalar_type_of<acc_t>()).contiguous();
  const acc_t* data = weights.const_data_ptr<acc_t>();
  return std::vector<acc_t>(data, data + batch);
}

// nll[b] and the gradients of x, x_hat and x_log_scale; `weights[b]` is the weight w_b of row b
// in the loss whose gradient is formed (nll.cpp).
template <typename acc_t>
void nll_pass(const ElboArgs& args, const ElboOutputs& out, const acc_t* weights, acc_t* nll);

// kl[b], kl_term[b] and the latent gradients, with `weights[b]` = beta * w_b; with a capacity
// the pass applies it to kl_term and to the row weights itself (kl.cpp).
template <typename acc_t>
void kl_pass(const ElboArgs& args, const ElboOutputs& out, const acc_t* weights, acc_t* kl,
             acc_t* kl_term);

FASTVAE_NAMESPACE_END
