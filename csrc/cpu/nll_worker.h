// The decoder terms on the CPU, a row at a time, shared by the ELBO's NLL pass (nll.cpp) and the
// importance-weighted bound (iwae.cpp): the NLL of x [B, D] given x_hat [S, B, D] and θ
// [Sl, Bl, Dl] (each 1 or S, B, D) or a constant, and the gradients of the three, each sample of
// the row weighted by its own weight.
#pragma once

#include <c10/macros/Macros.h>

#include <vector>

#include "../likelihoods.h"
#include "loops.h"
#include "passes.h"
#include "vec_math_ops.h"

FASTVAE_NAMESPACE_BEGIN

// Outputs at least this large are written with non-temporal stores (far beyond the L2 cache).
constexpr size_t kStreamingBytes = size_t(8) << 20;

struct NllProblem {
  int64_t samples, batch, features;
  Data x, x_hat, log_scale;  // log_scale null: log_scale_constant everywhere
  int64_t scale_samples = 1, scale_batch = 1, scale_features = 1;  // θ's [Sl, Bl, Dl]
  double log_scale_constant = 0.0;
  MutableData grad_x, grad_x_hat, grad_log_scale;
  bool stream_outputs = false;  // gradients too large to stay in cache: write around it

  bool scale_per_sample() const { return scale_samples == samples; }
  bool scale_per_row() const { return scale_batch == batch; }
  bool element_scale() const { return log_scale.data && scale_features != 1; }
  bool wants_gradients() const { return grad_x.data || grad_x_hat.data || grad_log_scale.data; }
  // Offset of the θ row that sample s of row b uses.
  int64_t scale_row(int64_t s, int64_t b) const {
    return ((scale_per_sample() ? s : 0) * scale_batch + (scale_per_row() ? b : 0)) *
           scale_features;
  }
  // Chunk `chunk`'s partial sums of a θ gradient shared by the batch, in `partials` [chunks,
  // Sl * Dl]; null without them.
  template <typename acc_t>
  acc_t* chunk_partial(acc_t* partials, int64_t chunk) const {
    return partials ? partials + chunk * scale_samples * scale_features : nullptr;
  }
  NllProblem without_gradients() const {
    NllProblem p = *this;
    p.grad_x = p.grad_x_hat = p.grad_log_scale = MutableData{};
    return p;
  }
};

// The decoder part of a call to elbo or iwae (both have x, x_hat, x_log_scale in slots 0..2).
template <typename Args, typename Outputs>
NllProblem nll_problem(const Args& args, const Outputs& out) {
  const bool scale = uses_scale(args.likelihood);
  NllProblem p{args.samples, args.batch, args.features, data_of(args.x), data_of(args.x_hat),
               data_of(scale ? args.x_log_scale : nullptr)};
  if (p.log_scale.data) {
    p.scale_samples = args.x_log_scale->size(0);
    p.scale_batch = args.x_log_scale->size(1);
    p.scale_features = args.x_log_scale->size(2);
  }
  p.log_scale_constant = args.x_log_scale_const;
  p.grad_x = gradient_of(args, out, kX);
  p.grad_x_hat = gradient_of(args, out, kXHat);
  // A likelihood without θ has a zero θ gradient, already written by allocate_gradients.
  if (scale) p.grad_log_scale = gradient_of(args, out, kXLogScale);
  p.stream_outputs = args.x_hat->nbytes() >= kStreamingBytes;
  return p;
}

// What a sweep of NllWorker over a row forms. The ELBO takes the row's NLL and the gradients in
// one sweep; the importance-weighted bound needs every sample's NLL before any gradient (its
// sample weights are a softmax over them), so it sweeps twice, once for each.
enum class NllForm { kRowSumAndGradients, kSampleSums, kGradients };
template <NllForm kForm>
constexpr bool kFormsSums = kForm != NllForm::kGradients;
template <NllForm kForm>
constexpr bool kFormsGradients = kForm != NllForm::kSampleSums;

// The weight of each sample of a row in the gradient: values[s * stride] (stride 0: one for all).
template <typename acc_t>
struct SampleWeights {
  const acc_t* values = nullptr;
  int64_t stride = 0;
  acc_t operator[](int64_t s) const { return values[s * stride]; }
};

// Where one tile's gradients go. grad_x_sum and grad_log_scale (when accumulating) are added
// to; grad_x_hat and grad_log_scale (otherwise) are overwritten; sum_log_scale asks for Σ ∂θ·w.
template <typename acc_t>
struct NllTileOutputs {
  acc_t* grad_x_sum = nullptr;
  acc_t* grad_x_hat = nullptr;
  acc_t* grad_log_scale = nullptr;
  bool accumulate_log_scale = false;
  bool sum_log_scale = false;
  bool stream_x_hat = false;     // grad_x_hat is the (large, aligned) output itself
  bool stream_log_scale = false;  // likewise grad_log_scale, when overwritten
};

template <typename acc_t>
struct NllTileSums {
  acc_t nll = 0;
  acc_t weighted_grad_log_scale = 0;
};

// Writes one element's weighted θ gradient where `out` says. These per-element helpers are
// forced inline: with the external linkage of a header, GCC would call them once per vector.
template <typename T, typename acc_t>
C10_ALWAYS_INLINE void store_log_scale_grad(const T& weighted, int64_t i, const NllTileOutputs<acc_t>& out) {
  if (out.accumulate_log_scale) {
    store_as(load_as<T>(out.grad_log_scale + i) + weighted, out.grad_log_scale + i);
  } else {
    store_maybe_streaming(weighted, out.grad_log_scale + i, out.stream_log_scale);
  }
}

// Writes one element's gradients, weighted w, where `out` says; adds the weighted θ gradient to
// scale_sum when out.sum_log_scale.
template <typename Nll, typename T, typename acc_t>
C10_ALWAYS_INLINE void store_gradients(const NllTerms<T>& t, const T& w, int64_t i, const NllTileOutputs<acc_t>& out,
                     T& scale_sum) {
  if constexpr (Nll::kUsesScale) {
    if (out.grad_log_scale) store_log_scale_grad(t.grad_log_scale * w, i, out);
    if (out.sum_log_scale) scale_sum = scale_sum + t.grad_log_scale * w;
  }
  if (out.grad_x_sum) store_as(load_as<T>(out.grad_x_sum + i) + t.grad_x * w, out.grad_x_sum + i);
  if (out.grad_x_hat) store_maybe_streaming(t.grad_x_hat * w, out.grad_x_hat + i, out.stream_x_hat);
}

// n elements of one sample's tile. With a per-element θ, e^-θ is formed in a sweep ahead of
// the main loop (see inverse_scale); with one θ for the tile, once. The terms a form does not
// take are left for the compiler to drop (the vector maths is free of side effects).
template <typename acc_t, typename Nll, bool kElementScale, NllForm kForm>
NllTileSums<acc_t> nll_tile(int64_t n, const acc_t* x, const acc_t* mean, const acc_t* log_scale,
                            acc_t log_scale_scalar, acc_t weight, const NllTileOutputs<acc_t>& out) {
  using Vec = at::vec::Vectorized<acc_t>;
  alignas(64) acc_t inv_scale[kElementScale ? kTile : 1];
  if constexpr (kElementScale) {
    vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      store_as(inverse_scale(load_as<T>(log_scale + i)), inv_scale + i);
    });
  }
  const acc_t inv_scale_scalar = Nll::kUsesScale ? inverse_scale(log_scale_scalar) : acc_t(0);
  Vec nll_vector(acc_t(0)), scale_vector(acc_t(0));
  acc_t nll_scalar = 0, scale_scalar_sum = 0;
  const auto element = [&](int64_t i, auto& nll_total, auto& scale_grad_total) {
    using T = std::decay_t<decltype(nll_total)>;
    const T theta = kElementScale ? load_as<T>(log_scale + i) : T(log_scale_scalar);
    const T inv = kElementScale ? load_as<T>(inv_scale + i) : T(inv_scale_scalar);
    const NllTerms<T> t = Nll::terms(load_as<T>(x + i), load_as<T>(mean + i), theta, inv);
    if constexpr (kFormsGradients<kForm>) store_gradients<Nll>(t, T(weight), i, out, scale_grad_total);
    if constexpr (kFormsSums<kForm>) nll_total = nll_total + t.nll;
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) element(i, nll_vector, scale_vector);
  for (; i < n; ++i) element(i, nll_scalar, scale_scalar_sum);
  return {sum_lanes(nll_vector) + nll_scalar, sum_lanes(scale_vector) + scale_scalar_sum};
}

// One sample's tile outputs, and where the tiles computed in a buffer are to be stored.
template <typename acc_t>
struct SampleTargets {
  NllTileOutputs<acc_t> out;
  void* grad_x_hat = nullptr;      // grad_x_hat's destination in its own dtype
  void* grad_log_scale = nullptr;  // likewise for an overwritten θ gradient
};

// Rows of one parallel task, with that task's tile buffers. row() walks a row's tiles of D, each
// over all samples; what it forms is kForm's. A θ gradient broadcast over B is summed per chunk
// into the chunk's partial sums (NllProblem::chunk_partial).
template <typename acc_t, typename Nll, bool kElementScale, NllForm kForm>
class NllWorker {
 public:
  explicit NllWorker(const NllProblem& p) : p_(p), scale_row_sums_(kElementScale ? 0 : p.samples) {}

  // Row b, sample s weighted weights[s] in the gradients. `sums` gains the NLL summed over D:
  // sums[0] over all samples (kRowSumAndGradients), sums[s] per sample (kSampleSums).
  void row(int64_t b, acc_t* partial, SampleWeights<acc_t> weights, double* sums) {
    partial_ = partial;
    weights_ = weights;
    sums_ = sums;
    std::fill(scale_row_sums_.begin(), scale_row_sums_.end(), acc_t(0));
    for (int64_t t0 = 0; t0 < p_.features; t0 += kTile) tile(b, t0, std::min(kTile, p_.features - t0));
    if (!kElementScale && p_.grad_log_scale.data) store_scalar_scale_grads(b);
  }

 private:
  // θ per element, one row for all samples: its gradient is summed over samples in a buffer.
  bool sums_scale_over_samples() const {
    return kElementScale && p_.grad_log_scale.data && p_.scale_per_row() && !p_.scale_per_sample();
  }

  void tile(int64_t b, int64_t t0, int64_t n) {
    const acc_t* x = load(p_.x, b * p_.features + t0, n, x_buffer_);
    if (p_.grad_x.data) std::fill(grad_x_buffer_, grad_x_buffer_ + n, acc_t(0));
    const acc_t* shared_scale = nullptr;
    if (kElementScale && !p_.scale_per_sample()) {
      shared_scale = load(p_.log_scale, p_.scale_row(0, b) + t0, n, scale_buffer_);
    }
    if (sums_scale_over_samples()) std::fill(grad_scale_buffer_, grad_scale_buffer_ + n, acc_t(0));
    for (int64_t s = 0; s < p_.samples; ++s) sample_tile(s, b, t0, n, x, shared_scale);
    if (p_.grad_x.data) store(grad_x_buffer_, n, p_.grad_x, b * p_.features + t0);
    if (sums_scale_over_samples()) store(grad_scale_buffer_, n, p_.grad_log_scale, b * p_.features + t0);
  }

  void sample_tile(int64_t s, int64_t b, int64_t t0, int64_t n, const acc_t* x,
                   const acc_t* shared_scale) {
    const int64_t row = (s * p_.batch + b) * p_.features + t0;
    const acc_t* mean = load(p_.x_hat, row, n, mean_buffer_);
    const acc_t* scale = shared_scale;
    acc_t scale_scalar = static_cast<acc_t>(p_.log_scale_constant);
    if (kElementScale && p_.scale_per_sample()) {
      scale = load(p_.log_scale, p_.scale_row(s, b) + t0, n, scale_buffer_);
    } else if (!kElementScale && p_.log_scale.data) {
      scale_scalar = *load(p_.log_scale, p_.scale_row(s, b), 1, &scale_scalar);
    }
    const SampleTargets<acc_t> targets = targets_for(s, row, t0);
    const acc_t weight = kFormsGradients<kForm> ? weights_[s] : acc_t(0);
    const NllTileSums<acc_t> sums = nll_tile<acc_t, Nll, kElementScale, kForm>(
        n, x, mean, scale, scale_scalar, weight, targets.out);
    if constexpr (kFormsSums<kForm>) sums_[kForm == NllForm::kSampleSums ? s : 0] += sums.nll;
    if (targets.out.sum_log_scale) scale_row_sums_[s] += sums.weighted_grad_log_scale;
    if (targets.grad_x_hat) store_tile(targets.out.grad_x_hat, n, targets.grad_x_hat, p_.grad_x_hat.type);
    if (targets.grad_log_scale) {
      store_tile(targets.out.grad_log_scale, n, targets.grad_log_scale, p_.grad_log_scale.type);
    }
  }

  SampleTargets<acc_t> targets_for(int64_t s, int64_t row, int64_t t0) {
    SampleTargets<acc_t> t;
    if (p_.grad_x.data) t.out.grad_x_sum = grad_x_buffer_;
    if (p_.grad_x_hat.data) {
      t.grad_x_hat = advance(p_.grad_x_hat.data, p_.grad_x_hat.type, row);
      t.out.grad_x_hat = tile_target(t.grad_x_hat, p_.grad_x_hat.type, grad_mean_buffer_);
      t.out.stream_x_hat = p_.stream_outputs && t.out.grad_x_hat == t.grad_x_hat &&
                           can_stream(t.grad_x_hat);
    }
    if (!p_.grad_log_scale.data) return t;
    if (!kElementScale) {
      t.out.sum_log_scale = true;
    } else if (!p_.scale_per_row()) {  // θ shared by the batch: this chunk's partial sum
      t.out.grad_log_scale = partial_ + (p_.scale_per_sample() ? s : 0) * p_.scale_features + t0;
      t.out.accumulate_log_scale = true;
    } else if (!p_.scale_per_sample()) {
      t.out.grad_log_scale = grad_scale_buffer_;
      t.out.accumulate_log_scale = true;
    } else {
      t.grad_log_scale = advance(p_.grad_log_scale.data, p_.grad_log_scale.type, row);
      t.out.grad_log_scale = tile_target(t.grad_log_scale, p_.grad_log_scale.type, grad_scale_buffer_);
      t.out.stream_log_scale = p_.stream_outputs && t.out.grad_log_scale == t.grad_log_scale &&
                               can_stream(t.grad_log_scale);
    }
    return t;
  }

  // θ is one value per (sample, row): row b's sums go to θ's gradient or this chunk's partial.
  void store_scalar_scale_grads(int64_t b) {
    const int64_t samples = p_.samples;
    if (!p_.scale_per_row()) {
      for (int64_t s = 0; s < samples; ++s) partial_[p_.scale_per_sample() ? s : 0] += scale_row_sums_[s];
    } else if (p_.scale_per_sample()) {
      for (int64_t s = 0; s < samples; ++s) store(&scale_row_sums_[s], 1, p_.grad_log_scale, s * p_.batch + b);
    } else {
      acc_t total = 0;
      for (int64_t s = 0; s < samples; ++s) total += scale_row_sums_[s];
      store(&total, 1, p_.grad_log_scale, b);
    }
  }

  static const acc_t* load(Data source, int64_t offset, int64_t n, acc_t* buffer) {
    return load_tile(advance(source.data, source.type, offset), source.type, n, buffer);
  }
  static void store(const acc_t* values, int64_t n, MutableData target, int64_t offset) {
    store_tile(values, n, advance(target.data, target.type, offset), target.type);
  }

  const NllProblem& p_;
  // The row in progress: its chunk's θ partial sums, its sample weights and NLL sums.
  acc_t* partial_ = nullptr;
  SampleWeights<acc_t> weights_;
  double* sums_ = nullptr;
  std::vector<acc_t> scale_row_sums_;  // per sample, Σ ∂θ·w over the row (θ not per element)
  alignas(64) acc_t x_buffer_[kTile];
  alignas(64) acc_t mean_buffer_[kTile];
  alignas(64) acc_t scale_buffer_[kTile];
  alignas(64) acc_t grad_x_buffer_[kTile];
  alignas(64) acc_t grad_mean_buffer_[kTile];
  alignas(64) acc_t grad_scale_buffer_[kTile];
};

// The kind of NllWorker a call takes: its likelihood, and whether θ varies along D.
template <typename NllType, bool kElementScaleValue>
struct NllKind {
  using Nll = NllType;
  static constexpr bool kElementScale = kElementScaleValue;
};

// Calls run(NllKind<...>{}, partials) for p's likelihood and θ layout, where partials are the
// per-chunk sums [chunks, Sl * Dl] of a θ gradient shared by the batch (null without), zeroed
// first and summed in chunk order into that gradient after.
template <typename acc_t, typename Run>
void run_nll_kind(Likelihood likelihood, const NllProblem& p, const at::TensorOptions& options,
                  Run&& run) {
  const bool reduce_scale = p.grad_log_scale.data && !p.scale_per_row();
  at::Tensor partials;
  if (reduce_scale) {
    partials = at::zeros({chunk_batch(p.batch).count, p.scale_samples * p.scale_features},
                         options.dtype(scalar_type_of<acc_t>()));
  }
  acc_t* partial_data = reduce_scale ? partials.mutable_data_ptr<acc_t>() : nullptr;
  with_likelihood(likelihood, [&](auto likelihood_tag) {
    using Nll = decltype(likelihood_tag);
    if constexpr (Nll::kUsesScale) {
      if (p.element_scale()) return run(NllKind<Nll, true>{}, partial_data);
    }
    run(NllKind<Nll, false>{}, partial_data);
  });
  if (reduce_scale) reduce_partials<acc_t>(partials, p.grad_log_scale);
}

FASTVAE_NAMESPACE_END
