// The categorical likelihood on the CPU: per position (s, b, d) the NLL
// logsumexp_k ℓ_k − ℓ_t and, when wanted, the gradient w_b/S·(softmax(ℓ) − onehot(t)), in one
// pass over the logits from memory.
//
// Work: the D positions of each (s, b) are cut into blocks whose K × positions fit in the L2
// cache (the size depends on K only). A block's logits are read from memory once, by the
// first of two sweeps: the max over the classes; then, from cache, exp(ℓ − max) summed and,
// for the gradient, kept in a work buffer, from which the gradient is written once, scaled by
// w/Σ (streaming around the cache when large). One exp per logit: exp is what costs time here
// once the logits are in cache, and an online log-sum-exp needs a second one to rescale.
//   classes last   [S, B, D, K]: a position's K logits are contiguous; vectors run along K.
//   class-second   [S, B, K, D]: a block is the class rows of a run of positions, swept row
//                  by row; vectors run along D, into a max and a sum per position (arrays
//                  bounded by the block's positions, not by K; the work buffer is on the heap).
// Each block's NLL sum is a double partial; rows add their partials in order after the
// parallel loop, so results do not depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#include <cmath>
#include <limits>
#include <vector>

#include "huge_pages.h"
#include "kernels.h"
#include "loops.h"
#include "passes.h"
#include "tiles.h"
#include "vec_math_ops.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

// Logits per block (K × positions): a block's logits and work buffer stay in the L2 cache.
constexpr int64_t kBlockElements = int64_t(1) << 16;
// Positions per class-second block at least: a cache line of float32 per row.
constexpr int64_t kMinColumns = 16;
// Gradients at least this large are written with non-temporal stores (far beyond the L2 cache).
constexpr size_t kStreamingBytes = size_t(8) << 20;

template <typename acc_t>
struct Problem {
  int64_t samples, batch, features, classes;
  bool classes_last;
  const void* logits;
  c10::ScalarType logits_type;
  const void* target;
  bool target_bytes;      // uint8, else int64
  MutableData grad;       // null data: no gradient
  const acc_t* weights;   // [B] w_b/S
  bool stream;            // write the gradient around the cache
  int64_t block, blocks;  // positions per block, blocks per (s, b)

  // The class index at (b, d); -1 stands for any outside [0, K).
  int64_t target_at(int64_t b, int64_t d) const {
    const int64_t index = b * features + d;
    const int64_t t = target_bytes ? static_cast<const uint8_t*>(target)[index]
                                   : static_cast<const int64_t*>(target)[index];
    return t >= 0 && t < classes ? t : -1;
  }
  acc_t logit_at(int64_t index) const {
    acc_t value;
    return *load_tile(advance(logits, logits_type, index), logits_type, 1, &value);
  }
};

template <typename acc_t>
constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

// Σ exp(x_i − shift) over n contiguous values, each term also stored to terms when not null.
template <typename acc_t>
acc_t sum_exp(const acc_t* x, int64_t n, acc_t shift, acc_t* terms) {
  at::vec::Vectorized<acc_t> vector_total(acc_t(0));
  acc_t scalar_total = 0;
  vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
    using T = typename decltype(width)::type;
    const T term = MathOps<T>::exp(load_as<T>(x + i) - T(shift));
    if (terms) store_as(term, terms + i);
    if constexpr (std::is_same_v<T, acc_t>) {
      scalar_total += term;
    } else {
      vector_total = vector_total + term;
    }
  });
  return sum_lanes(vector_total) + scalar_total;
}

// values_i·scale(i) → n elements of the gradient from element `offset`, in its dtype: written
// once, non-temporal where the gradient is large and aligned, rounded through `buffer` (≥ n
// elements) where it is not acc_t. scale(i, width) gives the factors of element i on.
template <typename acc_t, typename Scale>
void write_scaled(const acc_t* values, int64_t n, Scale scale, const Problem<acc_t>& p,
                  int64_t offset, acc_t* buffer) {
  void* destination = advance(p.grad.data, p.grad.type, offset);
  acc_t* out = tile_target(destination, p.grad.type, buffer);
  const bool streaming = p.stream && out == destination && can_stream(destination);
  vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
    using T = typename decltype(width)::type;
    store_maybe_streaming(load_as<T>(values + i) * scale(i, width), out + i, streaming);
  });
  if (out != destination) store_tile(out, n, destination, p.grad.type);
}

// One classes-last position: its NLL, and its gradient row written out. `values` and `work`
// hold K each (work null without a gradient).
template <typename acc_t>
acc_t last_position(const Problem<acc_t>& p, int64_t s, int64_t b, int64_t d, acc_t* values,
                    acc_t* work) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t n = p.classes, offset = ((s * p.batch + b) * p.features + d) * n;
  const acc_t* x = load_tile(advance(p.logits, p.logits_type, offset), p.logits_type, n, values);
  const acc_t top = at::vec::reduce_all<acc_t>(
      [](const Vec& a, const Vec& c) { return at::vec::maximum(a, c); }, x, n);
  const acc_t total = sum_exp(x, n, top, work);
  const int64_t t = p.target_at(b, d);
  const acc_t nll = t >= 0 ? top + std::log(total) - x[t] : kNaN<acc_t>;
  if (work) {
    // The target's term: (e_t − Σ)·w/Σ = w·(softmax_t − 1).
    if (t >= 0) work[t] -= total;
    const acc_t scale = (t >= 0 ? p.weights[b] : kNaN<acc_t>) / total;
    write_scaled(work, n, [scale](int64_t, auto width) {
      return typename decltype(width)::type(scale);
    }, p, offset, values);  // x is read: values may take the rounding
  }
  return nll;
}

// Class rows per step of the class-second sweeps: the per-position state is read and written
// once per step, not once per row.
constexpr int64_t kRows = 4;
// How many class rows ahead the first sweep requests the logits.
constexpr int64_t kPrefetchRows = 8 * kRows;

// Per-position state of one class-second block of n ≤ kTile positions.
template <typename acc_t>
struct Columns {
  alignas(64) acc_t top[kTile];          // max over the classes
  alignas(64) acc_t total[kTile];        // Σ exp(ℓ − top)
  alignas(64) acc_t rows[kRows][kTile];  // class rows widened; later the scales and rounding
};

// The class rows k0, k0 + 1, ... (up to kRows) of the block at `base`, as acc_t; their count.
template <typename acc_t>
int64_t load_rows(const Problem<acc_t>& p, int64_t base, int64_t k0, int64_t n,
                  Columns<acc_t>& c, const acc_t* (&x)[kRows]) {
  const int64_t rows = std::min(kRows, p.classes - k0);
  for (int64_t r = 0; r < rows; ++r) {
    x[r] = load_tile(advance(p.logits, p.logits_type, base + (k0 + r) * p.features),
                     p.logits_type, n, c.rows[r]);
  }
  return rows;
}

// Requests the cache lines of class rows [k0, k0 + kRows) of the block at `base`. A block's
// row segments are short runs, each in a page of its own, which the hardware prefetcher
// finds too late to hide the memory latency.
template <typename acc_t>
void prefetch_rows(const Problem<acc_t>& p, int64_t base, int64_t k0, int64_t n) {
  const int64_t bytes = n * element_size(p.logits_type);
  for (int64_t k = k0; k < std::min(p.classes, k0 + kRows); ++k) {
    const char* row = static_cast<const char*>(
        advance(p.logits, p.logits_type, base + k * p.features));
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
  }
}

// The block's column maxima (the pass that reads the logits from memory, row by row).
template <typename acc_t>
void column_max(const Problem<acc_t>& p, int64_t base, int64_t n, Columns<acc_t>& c) {
  std::fill(c.top, c.top + n, -std::numeric_limits<acc_t>::infinity());
  const acc_t* x[kRows];
  for (int64_t k0 = 0; k0 < p.classes; k0 += kRows) {
    prefetch_rows(p, base, k0 + kPrefetchRows, n);
    const int64_t rows = load_rows(p, base, k0, n, c, x);
    vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      T top = load_as<T>(c.top + i);
      for (int64_t r = 0; r < rows; ++r) top = MathOps<T>::max(top, load_as<T>(x[r] + i));
      store_as(top, c.top + i);
    });
  }
}

// The block's Σ exp(ℓ − top) per column, from cache; the terms to work ([K, n]) if given.
template <typename acc_t>
void column_sum_exp(const Problem<acc_t>& p, int64_t base, int64_t n, Columns<acc_t>& c,
                    acc_t* work) {
  std::fill(c.total, c.total + n, acc_t(0));
  const acc_t* x[kRows];
  for (int64_t k0 = 0; k0 < p.classes; k0 += kRows) {
    const int64_t rows = load_rows(p, base, k0, n, c, x);
    vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      const T top = load_as<T>(c.top + i);
      T total = load_as<T>(c.total + i);
      for (int64_t r = 0; r < rows; ++r) {
        const T term = MathOps<T>::exp(load_as<T>(x[r] + i) - top);
        if (work) store_as(term, work + (k0 + r) * n + i);
        total = total + term;
      }
      store_as(total, c.total + i);
    });
  }
}

// One class-second block: positions [d0, d0 + n) of (s, b); returns their NLL sum and writes
// their gradient from the terms in work, scaled per column by w/Σ (NaN for a bad target).
template <typename acc_t>
double second_block(const Problem<acc_t>& p, int64_t s, int64_t b, int64_t d0, int64_t n,
                    acc_t* work) {
  const int64_t base = (s * p.batch + b) * p.classes * p.features + d0;
  Columns<acc_t> c;
  column_max(p, base, n, c);
  column_sum_exp(p, base, n, c, work);
  acc_t* scale = c.rows[1];
  double nll = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = p.target_at(b, d0 + j);
    const bool valid = t >= 0;
    nll += valid ? c.top[j] + std::log(c.total[j]) - p.logit_at(base + t * p.features + j)
                 : kNaN<acc_t>;
    scale[j] = (valid ? p.weights[b] : kNaN<acc_t>) / c.total[j];
    if (work && valid) work[t * n + j] -= c.total[j];  // as in last_position
  }
  for (int64_t k = 0; work && k < p.classes; ++k) {
    write_scaled(work + k * n, n, [scale](int64_t i, auto width) {
      return load_as<typename decltype(width)::type>(scale + i);
    }, p, base + k * p.features, c.rows[0]);
  }
  return nll;
}

// Block `item` = ((s·B + b)·blocks + block): its NLL sum.
template <typename acc_t>
double run_block(const Problem<acc_t>& p, int64_t item, acc_t* values, acc_t* work) {
  const int64_t block = item % p.blocks, row = item / p.blocks;
  const int64_t s = row / p.batch, b = row % p.batch;
  const int64_t d0 = block * p.block, n = std::min(p.block, p.features - d0);
  if (!p.classes_last) return second_block(p, s, b, d0, n, work);
  double nll = 0;
  for (int64_t d = d0; d < d0 + n; ++d) nll += last_position(p, s, b, d, values, work);
  return nll;
}

template <typename acc_t>
Problem<acc_t> make_problem(const CategoricalArgs& args, const CategoricalOutputs& out,
                            const acc_t* weights) {
  const int64_t classes = args.classes;
  int64_t block = std::max<int64_t>(1, kBlockElements / classes);
  if (!args.classes_last) {  // a whole number of cache lines per row, and the stack state
    block = std::clamp<int64_t>(block / kMinColumns * kMinColumns, kMinColumns, kTile);
  }
  block = std::min(block, std::max<int64_t>(args.features, 1));
  const at::Tensor& logits = *args.logits;
  return {args.samples, args.batch, args.features, classes, args.classes_last,
          logits.const_data_ptr(), logits.scalar_type(), args.target->const_data_ptr(),
          args.target->scalar_type() == at::kByte,
          args.needs_grad ? MutableData{out.grad_logits.mutable_data_ptr(),
                                        out.grad_logits.scalar_type()}
                          : MutableData{},
          weights, out.grad_logits.nbytes() >= kStreamingBytes, block,
          (args.features + block - 1) / block};
}

// nll[b] = Σ over (s, block) of the partials, in order, over S; then the reduced loss.
template <typename acc_t>
void row_losses(const CategoricalArgs& args, const CategoricalOutputs& out,
                const std::vector<double>& partials, int64_t blocks) {
  acc_t* nll = out.nll.mutable_data_ptr<acc_t>();
  double all = 0;
  for (int64_t b = 0; b < args.batch; ++b) {
    double row = 0;
    for (int64_t s = 0; s < args.samples; ++s) {
      const double* first = partials.data() + (s * args.batch + b) * blocks;
      for (int64_t block = 0; block < blocks; ++block) row += first[block];
    }
    nll[b] = static_cast<acc_t>(row / static_cast<double>(args.samples));
    all += nll[b];
  }
  acc_t* loss = out.loss.mutable_data_ptr<acc_t>();
  if (args.reduction == Reduction::kNone) {
    std::copy(nll, nll + args.batch, loss);
  } else {
    *loss = static_cast<acc_t>(args.reduction == Reduction::kMean
                                   ? all / static_cast<double>(args.batch)
                                   : all);
  }
}

template <typename acc_t>
void categorical_kernel(const CategoricalArgs& args, const CategoricalOutputs& out) {
  // (a sample's share of its row's weight)
  std::vector<acc_t> weights =
      row_weights<acc_t>(args.grad_scale, args.batch, args.uniform_weight());
  for (acc_t& weight : weights) weight /= static_cast<acc_t>(args.samples);
  const Problem<acc_t> p = make_problem(args, out, weights.data());
  const int64_t items = args.samples * args.batch * p.blocks;
  std::vector<double> partials(items);
  // A per-task work buffer: the gradient of one block ([K, n] or one position's K).
  const int64_t work_size = p.classes * (p.classes_last ? 1 : p.block);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> values(p.classes_last ? p.classes : 0);
    std::vector<acc_t> work(p.grad.data ? work_size : 0);
    for (int64_t item = begin; item < end; ++item) {
      partials[item] = run_block(p, item, values.data(), p.grad.data ? work.data() : nullptr);
    }
    stream_fence();
  });
  row_losses<acc_t>(args, out, partials, p.blocks);
}

}  // namespace

CategoricalOutputs categorical_cpu(const CategoricalArgs& args) {
  CategoricalOutputs out = allocate_categorical_outputs(args);
  advise_huge_pages(out.grad_logits);
  if (args.accumulation == at::kDouble) {
    categorical_kernel<double>(args, out);
  } else {
    categorical_kernel<float>(args, out);
  }
  return out;
}

FASTVAE_NAMESPACE_END
