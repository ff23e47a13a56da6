// The mixture prior's log-ratio op pair on the CPU (contract: fastvae.backends.reference).
//
// Work layout. Rows are the samples (s, b), flat in [S·B]. Groups of kRows rows stream together
// over the components, a vector of them at a time, reading the transposed tables of
// MixtureComponents (component k of dim j at [j, k]): a vector's lanes are consecutive
// components, so the sum over d is a lane-wise multiply-add with no horizontal sum, and each
// table vector loaded serves the kRows rows. The log-sum-exp over components runs lane-wise
// (BranchlessLogSumExp<Vec>) and merges the lanes once per row. No [S, B, K] value is stored.
//
// Backward, pass 1 (the component stream): each block's responsibilities
// r_k = exp(logits_k + c_k − log_prior_sum) are re-formed from the forward's log_prior_sum; a
// second sweep over d accumulates Σ_k r_k(z − m_k)e^−v_k per row (a vector over components per
// dim, summed across lanes at the end, into a [S·B, d] scratch) and the component gradients.
// Those are sums over all rows: each chunk of rows adds into its own partial row, and the
// chunks' partials are added in chunk order (passes.h), so results do not depend on threading.
// Pass 2 (per datapoint b, samples in order): z's gradient from the scratch and q's terms, and
// mu's and logvar's gradients.
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "../mixture_math.h"
#include "loops.h"
#include "mixture.h"
#include "passes.h"
#include "vec_math_ops.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

// Rows streamed together: each table and partial-sum vector loaded serves them all, and their
// independent sums keep the multiply-add units busy (8 ran faster than 4 with both AVX2 and
// AVX-512 at K = 500, d = 32).
constexpr int kRows = 8;
// Sample rows a chunk has at least: fewer would make adding up the chunks' partial sums
// (2·d·K values each) cost as much as the rows themselves.
constexpr int64_t kMinChunkRows = 32;
// Partial-sum values at most (16 MiB of float32): bounds the chunk count for large K·d.
constexpr int64_t kPartialElements = int64_t(1) << 22;

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// A row of `tensor` ([rows, d]) as acc_t: the data itself, or `buffer` filled with it widened.
template <typename acc_t>
const acc_t* read_row(const at::Tensor& tensor, int64_t row, int64_t latent, acc_t* buffer) {
  return load_tile(advance(tensor.const_data_ptr(), tensor.scalar_type(), row * latent),
                   tensor.scalar_type(), latent, buffer);
}

// Σ_i term(i) over [0, n), vectors then the scalar tail (term(i, Width<T>) returns a T).
template <typename acc_t, typename Term>
acc_t sum_over(int64_t n, const Term& term) {
  Vec<acc_t> vector(acc_t(0));
  acc_t scalar = 0;
  int64_t i = 0;
  for (; i + Vec<acc_t>::size() <= n; i += Vec<acc_t>::size()) {
    vector = vector + term(i, Width<Vec<acc_t>>{});
  }
  for (; i < n; ++i) scalar += term(i, Width<acc_t>{});
  return sum_lanes(vector) + scalar;
}

// Up to kRows consecutive rows of z as acc_t; a short group repeats its last row, with upstream
// gradient 0, so every loop runs the full kRows (the repeats add exactly zero and are not
// stored).
template <typename acc_t>
class RowGroup {
 public:
  explicit RowGroup(const MixtureArgs& a) : a_(a), buffer_(kRows * a.latent) {}

  void load(int64_t first_row, int64_t end_row) {
    first = first_row;
    count = static_cast<int>(std::min<int64_t>(kRows, end_row - first_row));
    for (int r = 0; r < kRows; ++r) {
      z[r] = read_row(*a_.z, first + std::min(r, count - 1), a_.latent,
                      buffer_.data() + r * a_.latent);
    }
  }

  int64_t first = 0;
  int count = 0;
  const acc_t* z[kRows] = {};

 private:
  const MixtureArgs& a_;
  std::vector<acc_t> buffer_;
};

// The component tables as the row loops read them (see mixture_args.h).
template <typename acc_t>
struct Components {
  const acc_t* means_t;
  const acc_t* inv_var_t;
  const acc_t* offsets;
  int64_t latent, padded;

  Components(const MixtureComponents& c, int64_t d)
      : means_t(c.means_t.const_data_ptr<acc_t>()), inv_var_t(c.inv_var_t.const_data_ptr<acc_t>()),
        offsets(c.offsets.const_data_ptr<acc_t>()), latent(d), padded(c.padded) {}

  // logits_k + c_k for the components k, k + 1, … of one vector, at each row's sample.
  void terms(const RowGroup<acc_t>& rows, int64_t k, Vec<acc_t> (&out)[kRows]) const {
    using V = Vec<acc_t>;
    V square_sums[kRows];
    for (V& sum : square_sums) sum = V(acc_t(0));
    for (int64_t j = 0; j < latent; ++j) {
      const V mean = V::loadu(means_t + j * padded + k);
      const V inv_var = V::loadu(inv_var_t + j * padded + k);
      for (int r = 0; r < kRows; ++r) {
        const V residual = V(rows.z[r][j]) - mean;
        square_sums[r] = at::vec::fmadd(residual * residual, inv_var, square_sums[r]);
      }
    }
    const V offset = V::loadu(offsets + k);
    for (int r = 0; r < kRows; ++r) out[r] = offset - V(acc_t(0.5)) * square_sums[r];
  }
};

// log q(z|x) = −½Σ_d((z − μ)²e^−λ + λ) of one sample z of datapoint b.
template <typename acc_t>
acc_t log_q(const MixtureArgs& a, const acc_t* z, int64_t b, acc_t* buffers) {
  const acc_t* mu = read_row(*a.mu, b, a.latent, buffers);
  const acc_t* logvar = read_row(*a.logvar, b, a.latent, buffers + a.latent);
  return acc_t(-0.5) * sum_over<acc_t>(a.latent, [&](int64_t i, auto width) {
    using T = typename decltype(width)::type;
    const T residual = load_as<T>(z + i) - load_as<T>(mu + i);
    const T lv = load_as<T>(logvar + i);
    return residual * residual * MathOps<T>::exp(T(0) - lv) + lv;
  });
}

// log Σ over a lane-wise stream's lanes.
template <typename acc_t>
acc_t merge_lanes(const BranchlessLogSumExp<Vec<acc_t>>& lanes) {
  alignas(64) acc_t maxima[Vec<acc_t>::size()];
  alignas(64) acc_t sums[Vec<acc_t>::size()];
  lanes.maximum.store(maxima);
  lanes.sum.store(sums);
  BranchlessLogSumExp<acc_t> total;
  for (int64_t lane = 0; lane < Vec<acc_t>::size(); ++lane) total.add(maxima[lane], sums[lane]);
  return total.value();
}

template <typename acc_t>
void forward_rows(const MixtureArgs& a, const MixtureComponents& c, at::Tensor& log_ratio_out,
                  at::Tensor& log_prior_sum_out) {
  acc_t* log_ratio = log_ratio_out.mutable_data_ptr<acc_t>();
  acc_t* log_prior_sum = log_prior_sum_out.mutable_data_ptr<acc_t>();
  const Components<acc_t> components(c, a.latent);
  const acc_t log_norm = c.log_norm.item<acc_t>();
  const int64_t rows = a.samples * a.batch, groups = (rows + kRows - 1) / kRows;
  const int64_t work = kRows * (a.latent + 1) * c.padded;
  at::parallel_for(0, groups, std::max<int64_t>(1, kElementsPerTask / work),
                   [&](int64_t begin, int64_t end) {
    RowGroup<acc_t> group(a);
    std::vector<acc_t> buffers(2 * a.latent);
    for (int64_t g = begin; g < end; ++g) {
      group.load(g * kRows, rows);
      BranchlessLogSumExp<Vec<acc_t>> lanes[kRows];
      Vec<acc_t> terms[kRows];
      for (int64_t k = 0; k < c.padded; k += Vec<acc_t>::size()) {
        components.terms(group, k, terms);
        for (int r = 0; r < kRows; ++r) lanes[r].add(terms[r]);
      }
      for (int r = 0; r < group.count; ++r) {
        const int64_t row = group.first + r;
        log_prior_sum[row] = merge_lanes(lanes[r]);
        log_ratio[row] = log_q(a, group.z[r], row % a.batch, buffers.data()) -
                         (log_prior_sum[row] - log_norm);
      }
    }
  });
}

// Rows per chunk of the component stream: at least kMinChunkRows, at most kMaxChunks chunks
// whose partial sums fit in kPartialElements, whole row groups. At least one chunk, so that an
// empty batch still yields (zero) partial sums.
Chunking stream_chunks(int64_t rows, int64_t columns) {
  const int64_t most = std::clamp<int64_t>(kPartialElements / columns, 1, kMaxChunks);
  const int64_t chunk_rows = std::max((rows + most - 1) / most, kMinChunkRows);
  const int64_t whole_groups = (chunk_rows + kRows - 1) / kRows * kRows;
  return {whole_groups, std::max<int64_t>(1, (rows + whole_groups - 1) / whole_groups)};
}

// Pass 1 for the row groups of the chunks one parallel task was given.
template <typename acc_t>
class ComponentStream {
 public:
  ComponentStream(const MixtureArgs& a, const MixtureComponents& c, const acc_t* grad,
                  const acc_t* log_prior_sum, acc_t* z_sum)
      : a_(a), components_(c, a.latent), grad_(grad), log_prior_sum_(log_prior_sum),
        z_sum_(z_sum), group_(a), z_terms_(kRows * a.latent) {}

  // The rows [first, end), their component gradients added into `partial`.
  void run(int64_t first, int64_t end, acc_t* partial) {
    for (int64_t row = first; row < end; row += kRows) {
      group_.load(row, end);
      for (int r = 0; r < kRows; ++r) {
        const bool real = r < group_.count;
        g_[r] = real ? grad_[row + r] : acc_t(0);
        log_prior_sum_rows_[r] = log_prior_sum_[row + (real ? r : group_.count - 1)];
      }
      std::fill(z_terms_.begin(), z_terms_.end(), Vec<acc_t>(acc_t(0)));
      for (int64_t k = 0; k < components_.padded; k += Vec<acc_t>::size()) block(k, partial);
      for (int r = 0; r < group_.count; ++r) finish_row(r, partial);
    }
  }

 private:
  // The components k… of one vector: their responsibilities, their share of each row's
  // Σ_k r_k(z − m_k)e^−v_k, and their gradients added into the partial sums, weighted by
  // coef = −g·r_k.
  void block(int64_t k, acc_t* partial) {
    using V = Vec<acc_t>;
    const int64_t padded = components_.padded, table = a_.latent * padded;
    V responsibility[kRows], coef[kRows];
    components_.terms(group_, k, responsibility);
    for (int r = 0; r < kRows; ++r) {
      responsibility[r] = (responsibility[r] - V(log_prior_sum_rows_[r])).exp();
      coef[r] = V(-g_[r]) * responsibility[r];
    }
    for (int64_t j = 0; j < a_.latent; ++j) {
      const int64_t index = j * padded + k;
      const V mean = V::loadu(components_.means_t + index);
      const V inv_var = V::loadu(components_.inv_var_t + index);
      V mean_grad = V::loadu(partial + index), logvar_grad = V::loadu(partial + table + index);
      for (int r = 0; r < kRows; ++r) {
        const V residual = V(group_.z[r][j]) - mean;
        const V scaled = residual * inv_var;
        V& z_term = z_terms_[r * a_.latent + j];
        z_term = at::vec::fmadd(responsibility[r], scaled, z_term);
        mean_grad = at::vec::fmadd(coef[r], scaled, mean_grad);
        logvar_grad = at::vec::fmadd(coef[r], log_variance_gradient(residual, scaled), logvar_grad);
      }
      mean_grad.store(partial + index);
      logvar_grad.store(partial + table + index);
    }
    V logit_grad = V::loadu(partial + 2 * table + k);
    for (const V& value : coef) logit_grad = logit_grad + value;
    logit_grad.store(partial + 2 * table + k);
  }

  void finish_row(int r, acc_t* partial) {
    partial[(2 * a_.latent + 1) * components_.padded] += g_[r];
    if (!z_sum_) return;
    acc_t* out = z_sum_ + (group_.first + r) * a_.latent;
    for (int64_t j = 0; j < a_.latent; ++j) out[j] = sum_lanes(z_terms_[r * a_.latent + j]);
  }

  const MixtureArgs& a_;
  const Components<acc_t> components_;
  const acc_t* grad_;
  const acc_t* log_prior_sum_;
  acc_t* z_sum_;  // [S·B, d] Σ_k r_k(z − m_k)e^−v_k, or null when z's gradient is not wanted
  RowGroup<acc_t> group_;
  acc_t g_[kRows] = {};
  acc_t log_prior_sum_rows_[kRows] = {};
  std::vector<Vec<acc_t>> z_terms_;  // [kRows, d], a lane per component
};

// Row `row` of a [rows, d] gradient from acc_t values; nothing where it is not wanted (empty).
template <typename acc_t>
void store_row(const at::Tensor& grad, int64_t row, int64_t latent, const acc_t* values) {
  if (grad.numel() == 0) return;
  store_tile(values, latent, advance(grad.mutable_data_ptr(), grad.scalar_type(), row * latent),
             grad.scalar_type());
}

// Pass 2 for one datapoint b: z's gradient g·(z_sum − (z − μ)e^−λ) for each sample, and Σ_s of
// g·∂ log q for mu and logvar, into the wanted gradients (empty: not wanted). `buffers`: 7·d.
template <typename acc_t>
void datapoint_grads(const MixtureArgs& a, int64_t b, const acc_t* grad, const acc_t* z_sum,
                     std::array<at::Tensor, 6>& grads, acc_t* buffers) {
  const int64_t d = a.latent;
  const acc_t* mu = read_row(*a.mu, b, d, buffers);
  const acc_t* logvar = read_row(*a.logvar, b, d, buffers + d);
  acc_t *inv_var = buffers + 3 * d, *grad_z = inv_var + d, *sums = grad_z + d;  // sums: 2·d
  vectorized_for<acc_t>(d, [&](int64_t i, auto width) {
    using T = typename decltype(width)::type;
    store_as(MathOps<T>::exp(T(0) - load_as<T>(logvar + i)), inv_var + i);
    store_as(T(0), sums + i);
    store_as(T(0), sums + d + i);
  });
  for (int64_t s = 0; s < a.samples; ++s) {
    const int64_t row = s * a.batch + b;
    const acc_t* z = read_row(*a.z, row, d, buffers + 2 * d);
    vectorized_for<acc_t>(d, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      const T g(grad[row]), residual = load_as<T>(z + i) - load_as<T>(mu + i);
      const T scaled = residual * load_as<T>(inv_var + i);
      if (z_sum) store_as(g * (load_as<T>(z_sum + row * d + i) - scaled), grad_z + i);
      store_as(load_as<T>(sums + i) + g * scaled, sums + i);
      store_as(load_as<T>(sums + d + i) + g * log_variance_gradient(residual, scaled),
               sums + d + i);
    });
    if (z_sum) store_row(grads[0], row, d, grad_z);
  }
  store_row(grads[1], b, d, sums);
  store_row(grads[2], b, d, sums + d);
}

// Pass 1 over all rows; returns the partial sums totalled in chunk order.
template <typename acc_t>
at::Tensor component_stream(const MixtureArgs& a, const MixtureComponents& c,
                            const at::Tensor& grad, const at::Tensor& log_prior_sum,
                            acc_t* z_sum) {
  const int64_t rows = a.samples * a.batch, columns = partial_columns(a, c);
  const Chunking chunking = stream_chunks(rows, columns);
  at::Tensor partials = at::zeros({chunking.count, columns}, grad.options());
  acc_t* partial_data = partials.mutable_data_ptr<acc_t>();
  at::parallel_for(0, chunking.count, chunks_per_task(chunking, a.latent * c.padded),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    ComponentStream<acc_t> stream(a, c, grad.const_data_ptr<acc_t>(),
                                  log_prior_sum.const_data_ptr<acc_t>(), z_sum);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      stream.run(chunking.begin(chunk), chunking.end(chunk, rows), partial_data + chunk * columns);
    }
  });
  at::Tensor totals = at::empty({columns}, grad.options());
  reduce_partials<acc_t>(partials, {totals.mutable_data_ptr(), totals.scalar_type()});
  return totals;
}

template <typename acc_t>
void backward_pass(const MixtureArgs& a, const MixtureComponents& c, const at::Tensor& grad,
                   const at::Tensor& log_prior_sum, const MixtureNeeds& needs,
                   std::array<at::Tensor, 6>& grads) {
  at::Tensor z_sum;
  if (needs[0]) z_sum = at::empty({a.samples * a.batch, a.latent}, grad.options());
  acc_t* z_sum_data = needs[0] ? z_sum.mutable_data_ptr<acc_t>() : nullptr;
  if (needs[0] || needs[3] || needs[4] || needs[5]) {
    const at::Tensor totals = component_stream<acc_t>(a, c, grad, log_prior_sum, z_sum_data);
    store_component_grads(a, c, totals, grads);
  }
  if (!(needs[0] || needs[1] || needs[2])) return;
  const int64_t work = std::max<int64_t>(1, a.samples * a.latent);
  at::parallel_for(0, a.batch, std::max<int64_t>(1, kElementsPerTask / work),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffers(7 * a.latent);
    for (int64_t b = begin; b < end; ++b) {
      datapoint_grads(a, b, grad.const_data_ptr<acc_t>(), z_sum_data, grads, buffers.data());
    }
  });
}

}  // namespace

MixtureForward mixture_log_ratio_cpu(const at::Tensor& z, const at::Tensor& mu,
                                     const at::Tensor& logvar, const at::Tensor& means,
                                     const at::Tensor& logvars, const at::Tensor& logits) {
  return mixture_forward(z, mu, logvar, means, logvars, logits,
                         {&forward_rows<float>, &forward_rows<double>});
}

MixtureGrads mixture_log_ratio_backward_cpu(const at::Tensor& grad, const at::Tensor& z,
                                            const at::Tensor& mu, const at::Tensor& logvar,
                                            const at::Tensor& means, const at::Tensor& logvars,
                                            const at::Tensor& logits,
                                            const at::Tensor& log_prior_sum, MixtureNeeds needs) {
  return mixture_backward(grad, z, mu, logvar, means, logvars, logits, log_prior_sum, needs,
                          {&backward_pass<float>, &backward_pass<double>});
}

FASTVAE_NAMESPACE_END
