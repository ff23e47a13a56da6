// The fused ELBO on the CPU: one pass over x, x_hat and x_logvar computes the NLL rows and
// writes their gradients; a second, small pass over the latents does the same for the KL.
//
// Determinism: rows are grouped into chunks whose size depends only on the batch size. A sum
// across rows (a broadcast input's gradient, the free-bits batch mean) is formed per chunk and
// the chunk partials are added in chunk order, so the result does not depend on how
// at::parallel_for spreads the chunks over threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "../elementwise.h"
#include "huge_pages.h"
#include "loops.h"
#include "kernels.h"
#include "tiles.h"
#include "vec_math_ops.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

enum Input { kX, kXHat, kXLogvar, kMu, kLogvar, kPriorMu, kPriorLogvar, kInputCount };

// Upper bound on the chunks per pass: bounds the partial-sum buffers ([chunks, columns]).
constexpr int64_t kMaxChunks = 256;
// Outputs at least this large are written with non-temporal stores (far beyond the L2 cache).
constexpr size_t kStreamingBytes = size_t(8) << 20;
// Elements of work below which a parallel task is not worth starting.
constexpr int64_t kElementsPerTask = 1 << 15;

struct Chunking {
  int64_t rows;   // rows per chunk
  int64_t count;  // number of chunks
  int64_t begin(int64_t chunk) const { return chunk * rows; }
  int64_t end(int64_t chunk, int64_t batch) const { return std::min(batch, (chunk + 1) * rows); }
};

Chunking chunk_batch(int64_t batch) {
  const int64_t rows = std::max<int64_t>(1, (batch + kMaxChunks - 1) / kMaxChunks);
  return {rows, (batch + rows - 1) / rows};
}

int64_t chunks_per_task(const Chunking& chunking, int64_t elements_per_row) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, chunking.rows * elements_per_row));
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

// ------------------------------------------------------------------------------------------
// NLL: x [B, D], x_hat [S, B, D], x_logvar [Sl, Bl, Dl] or a constant.
// ------------------------------------------------------------------------------------------
struct NllProblem {
  int64_t samples, batch, features;
  Data x, x_hat, x_logvar;
  int64_t logvar_samples = 1, logvar_batch = 1, logvar_features = 1;
  double logvar_constant = 0.0;
  bool bernoulli = false;
  MutableData grad_x, grad_x_hat, grad_x_logvar;
  bool stream_outputs = false;  // gradients too large to stay in cache: write around it
};

// Where one tile's gradients go. grad_x_sum and grad_logvar (when accumulating) are added to;
// grad_x_hat and grad_logvar (otherwise) are overwritten; sum_logvar asks for Σ d_logvar·w.
template <typename acc_t>
struct NllTileOutputs {
  acc_t* grad_x_sum = nullptr;
  acc_t* grad_x_hat = nullptr;
  acc_t* grad_logvar = nullptr;
  bool accumulate_logvar = false;
  bool sum_logvar = false;
  bool stream_x_hat = false;   // grad_x_hat is the (large, aligned) output itself
  bool stream_logvar = false;  // likewise grad_logvar, when overwritten
};

template <typename acc_t>
struct NllTileSums {
  acc_t nll = 0;
  acc_t weighted_grad_logvar = 0;
};

// The precision e^-logvar is formed before the main loop (a sweep over the tile for a
// per-element logvar, once for a broadcast one): the exp is an out-of-line call, and calls in
// the main loop would spill its many live vectors around every one of them.
template <typename acc_t, bool kBernoulli, bool kElementLogvar>
NllTileSums<acc_t> nll_tile(int64_t n, const acc_t* x, const acc_t* mean, const acc_t* logvar,
                            acc_t logvar_scalar, acc_t weight, const NllTileOutputs<acc_t>& out) {
  using Vec = at::vec::Vectorized<acc_t>;
  alignas(64) acc_t precision[kElementLogvar ? kTile : 1];
  if constexpr (kElementLogvar) {
    vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      store_as(gaussian_precision(load_as<T>(logvar + i)), precision + i);
    });
  }
  const acc_t precision_scalar = kBernoulli ? acc_t(0) : gaussian_precision(logvar_scalar);
  Vec nll_vector(acc_t(0)), logvar_vector(acc_t(0));
  acc_t nll_scalar = 0, logvar_scalar_sum = 0;
  const auto element = [&](int64_t i, auto& nll_total, auto& logvar_grad_total) {
    using T = std::decay_t<decltype(nll_total)>;
    const T w(weight);
    const T x_value = load_as<T>(x + i), mean_value = load_as<T>(mean + i);
    T nll, grad_x, grad_mean, grad_logvar;
    if constexpr (kBernoulli) {
      bernoulli_nll(x_value, mean_value, nll, grad_x, grad_mean);
    } else {
      const T logvar_value = kElementLogvar ? load_as<T>(logvar + i) : T(logvar_scalar);
      const T precision_value = kElementLogvar ? load_as<T>(precision + i) : T(precision_scalar);
      gaussian_nll_with_precision(x_value, mean_value, logvar_value, precision_value, nll, grad_x,
                                  grad_mean, grad_logvar);
      if (out.grad_logvar) {
        const T weighted = grad_logvar * w;
        if (out.accumulate_logvar) {
          store_as(load_as<T>(out.grad_logvar + i) + weighted, out.grad_logvar + i);
        } else {
          store_maybe_streaming(weighted, out.grad_logvar + i, out.stream_logvar);
        }
      }
      if (out.sum_logvar) logvar_grad_total = logvar_grad_total + grad_logvar * w;
    }
    if (out.grad_x_sum) store_as(load_as<T>(out.grad_x_sum + i) + grad_x * w, out.grad_x_sum + i);
    if (out.grad_x_hat) store_maybe_streaming(grad_mean * w, out.grad_x_hat + i, out.stream_x_hat);
    nll_total = nll_total + nll;
  };
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) element(i, nll_vector, logvar_vector);
  for (; i < n; ++i) element(i, nll_scalar, logvar_scalar_sum);
  return {sum_lanes(nll_vector) + nll_scalar, sum_lanes(logvar_vector) + logvar_scalar_sum};
}

// Fills nll_rows[b] and the x, x_hat, x_logvar gradients. `weights[b]` is the weight w_b of
// row b in the loss whose gradient is formed. A gradient of x_logvar broadcast over B is summed
// per chunk into `logvar_partials` [chunks, Sl * Dl], reduced by the caller.
template <typename acc_t, bool kBernoulli, bool kElementLogvar>
void nll_rows(const NllProblem& p, const acc_t* weights, const Chunking& chunking,
              acc_t* nll_rows, acc_t* logvar_partials) {
  const int64_t samples = p.samples, batch = p.batch, features = p.features;
  const bool logvar_per_sample = p.logvar_samples == samples;
  const bool logvar_per_row = p.logvar_batch == batch;
  const bool need_x = p.grad_x.data, need_x_hat = p.grad_x_hat.data;
  const bool need_logvar = p.grad_x_logvar.data;
  const int64_t partial_columns = p.logvar_samples * p.logvar_features;
  // Offset of the x_logvar row used by sample s of row b.
  const auto logvar_row = [&](int64_t s, int64_t b) {
    return ((logvar_per_sample ? s : 0) * p.logvar_batch + (logvar_per_row ? b : 0)) *
           p.logvar_features;
  };

  at::parallel_for(0, chunking.count, chunks_per_task(chunking, samples * features),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    alignas(64) acc_t x_buffer[kTile], mean_buffer[kTile], logvar_buffer[kTile];
    alignas(64) acc_t grad_x_buffer[kTile], grad_mean_buffer[kTile], grad_logvar_buffer[kTile];
    std::vector<acc_t> logvar_row_sums(kElementLogvar ? 0 : samples);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* partial = logvar_partials ? logvar_partials + chunk * partial_columns : nullptr;
      for (int64_t b = chunking.begin(chunk); b < chunking.end(chunk, batch); ++b) {
        const acc_t weight = weights[b] / static_cast<acc_t>(samples);
        double nll_total = 0;
        std::fill(logvar_row_sums.begin(), logvar_row_sums.end(), acc_t(0));
        for (int64_t t0 = 0; t0 < features; t0 += kTile) {
          const int64_t n = std::min(kTile, features - t0);
          const acc_t* x_tile = load_tile(advance(p.x.data, p.x.type, b * features + t0),
                                          p.x.type, n, x_buffer);
          if (need_x) std::fill(grad_x_buffer, grad_x_buffer + n, acc_t(0));
          const acc_t* logvar_tile = nullptr;
          if (kElementLogvar && !logvar_per_sample) {
            logvar_tile = load_tile(advance(p.x_logvar.data, p.x_logvar.type, logvar_row(0, b) + t0),
                                    p.x_logvar.type, n, logvar_buffer);
          }
          const bool sum_logvar_over_samples = kElementLogvar && need_logvar && logvar_per_row &&
                                               !logvar_per_sample;
          if (sum_logvar_over_samples) std::fill(grad_logvar_buffer, grad_logvar_buffer + n, acc_t(0));

          for (int64_t s = 0; s < samples; ++s) {
            const int64_t row = (s * batch + b) * features + t0;
            const acc_t* mean_tile = load_tile(advance(p.x_hat.data, p.x_hat.type, row),
                                               p.x_hat.type, n, mean_buffer);
            acc_t logvar_scalar = static_cast<acc_t>(p.logvar_constant);
            if (kElementLogvar && logvar_per_sample) {
              logvar_tile = load_tile(advance(p.x_logvar.data, p.x_logvar.type, logvar_row(s, b) + t0),
                                      p.x_logvar.type, n, logvar_buffer);
            } else if (!kElementLogvar && p.x_logvar.data) {
              acc_t converted;
              logvar_scalar = *load_tile(advance(p.x_logvar.data, p.x_logvar.type, logvar_row(s, b)),
                                         p.x_logvar.type, 1, &converted);
            }

            NllTileOutputs<acc_t> out;
            out.grad_x_sum = need_x ? grad_x_buffer : nullptr;
            void* grad_mean_target = need_x_hat ? advance(p.grad_x_hat.data, p.grad_x_hat.type, row)
                                                : nullptr;
            if (need_x_hat) {
              out.grad_x_hat = tile_target(grad_mean_target, p.grad_x_hat.type, grad_mean_buffer);
              out.stream_x_hat = p.stream_outputs && out.grad_x_hat == grad_mean_target &&
                                 can_stream(grad_mean_target);
            }
            void* grad_logvar_target = nullptr;
            if (need_logvar && kElementLogvar) {
              if (!logvar_per_row) {
                out.grad_logvar = partial + (logvar_per_sample ? s : 0) * p.logvar_features + t0;
                out.accumulate_logvar = true;
              } else if (!logvar_per_sample) {
                out.grad_logvar = grad_logvar_buffer;
                out.accumulate_logvar = true;
              } else {
                grad_logvar_target = advance(p.grad_x_logvar.data, p.grad_x_logvar.type, row);
                out.grad_logvar = tile_target(grad_logvar_target, p.grad_x_logvar.type, grad_logvar_buffer);
                out.stream_logvar = p.stream_outputs && out.grad_logvar == grad_logvar_target &&
                                    can_stream(grad_logvar_target);
              }
            }
            out.sum_logvar = need_logvar && !kElementLogvar;

            const NllTileSums<acc_t> sums = nll_tile<acc_t, kBernoulli, kElementLogvar>(
                n, x_tile, mean_tile, logvar_tile, logvar_scalar, weight, out);
            nll_total += sums.nll;
            if (out.sum_logvar) logvar_row_sums[s] += sums.weighted_grad_logvar;
            if (need_x_hat) store_tile(out.grad_x_hat, n, grad_mean_target, p.grad_x_hat.type);
            if (grad_logvar_target) store_tile(out.grad_logvar, n, grad_logvar_target, p.grad_x_logvar.type);
          }

          if (need_x) {
            store_tile(grad_x_buffer, n, advance(p.grad_x.data, p.grad_x.type, b * features + t0),
                       p.grad_x.type);
          }
          if (sum_logvar_over_samples) {
            store_tile(grad_logvar_buffer, n,
                       advance(p.grad_x_logvar.data, p.grad_x_logvar.type, b * features + t0),
                       p.grad_x_logvar.type);
          }
        }
        nll_rows[b] = static_cast<acc_t>(nll_total) / static_cast<acc_t>(samples);

        if (need_logvar && !kElementLogvar) {  // x_logvar is one value per (sample, row)
          if (!logvar_per_row) {
            for (int64_t s = 0; s < samples; ++s) partial[logvar_per_sample ? s : 0] += logvar_row_sums[s];
          } else if (logvar_per_sample) {
            for (int64_t s = 0; s < samples; ++s) {
              store_tile(&logvar_row_sums[s], 1,
                         advance(p.grad_x_logvar.data, p.grad_x_logvar.type, s * batch + b),
                         p.grad_x_logvar.type);
            }
          } else {
            acc_t total = 0;
            for (int64_t s = 0; s < samples; ++s) total += logvar_row_sums[s];
            store_tile(&total, 1, advance(p.grad_x_logvar.data, p.grad_x_logvar.type, b),
                       p.grad_x_logvar.type);
          }
        }
      }
    }
    stream_fence();
  });
}

template <typename acc_t>
void nll_pass(const NllProblem& p, const acc_t* weights, acc_t* nll, const at::TensorOptions& options) {
  const Chunking chunking = chunk_batch(p.batch);
  const bool reduce_logvar = p.grad_x_logvar.data && p.logvar_batch != p.batch;
  at::Tensor partials;
  if (reduce_logvar) {
    partials = at::zeros({chunking.count, p.logvar_samples * p.logvar_features},
                         options.dtype(scalar_type_of<acc_t>()));
  }
  acc_t* partial_data = reduce_logvar ? partials.mutable_data_ptr<acc_t>() : nullptr;
  if (p.bernoulli) {
    nll_rows<acc_t, true, false>(p, weights, chunking, nll, partial_data);
  } else if (p.x_logvar.data && p.logvar_features != 1) {
    nll_rows<acc_t, false, true>(p, weights, chunking, nll, partial_data);
  } else {
    nll_rows<acc_t, false, false>(p, weights, chunking, nll, partial_data);
  }
  if (reduce_logvar) reduce_partials<acc_t>(partials, p.grad_x_logvar);
}

// ------------------------------------------------------------------------------------------
// KL: mu, logvar [B, d]; prior_mu, prior_logvar [Bp, d] (Bp in {1, B}) or the standard normal.
// ------------------------------------------------------------------------------------------
struct KlProblem {
  int64_t batch, latent;
  Data mu, logvar, prior_mu, prior_logvar;  // prior data null for the standard normal
  bool prior_per_row = true;
  double free_bits = 0.0;
  MutableData grad_mu, grad_logvar, grad_prior_mu, grad_prior_logvar;
};

template <typename acc_t>
struct LatentTiles {
  const acc_t* mu;
  const acc_t* logvar;
  const acc_t* prior_mu;
  const acc_t* prior_logvar;
};

template <typename acc_t>
struct LatentBuffers {
  alignas(64) acc_t mu[kTile];
  alignas(64) acc_t logvar[kTile];
  alignas(64) acc_t prior_mu[kTile];
  alignas(64) acc_t prior_logvar[kTile];

  LatentTiles<acc_t> load(const KlProblem& p, int64_t b, int64_t j0, int64_t n) {
    const int64_t row = b * p.latent + j0;
    const int64_t prior_row = (p.prior_per_row ? b : 0) * p.latent + j0;
    LatentTiles<acc_t> tiles{};
    tiles.mu = load_tile(advance(p.mu.data, p.mu.type, row), p.mu.type, n, mu);
    tiles.logvar = load_tile(advance(p.logvar.data, p.logvar.type, row), p.logvar.type, n, logvar);
    if (p.prior_mu.data) {
      tiles.prior_mu = load_tile(advance(p.prior_mu.data, p.prior_mu.type, prior_row),
                                 p.prior_mu.type, n, prior_mu);
      tiles.prior_logvar = load_tile(advance(p.prior_logvar.data, p.prior_logvar.type, prior_row),
                                     p.prior_logvar.type, n, prior_logvar);
    }
    return tiles;
  }
};

template <typename T, typename acc_t>
void kl_element(const LatentTiles<acc_t>& tiles, int64_t i, T& kl, T& grad_mu, T& grad_logvar,
                T& grad_prior_logvar) {
  if (tiles.prior_mu) {
    prior_kl(load_as<T>(tiles.mu + i), load_as<T>(tiles.logvar + i), load_as<T>(tiles.prior_mu + i),
             load_as<T>(tiles.prior_logvar + i), kl, grad_mu, grad_logvar, grad_prior_logvar);
  } else {
    standard_kl(load_as<T>(tiles.mu + i), load_as<T>(tiles.logvar + i), kl, grad_mu, grad_logvar);
  }
}

// Column sums of the per-element KL, per chunk, into partials [chunks, d]: the free-bits test.
template <typename acc_t>
void kl_column_sums(const KlProblem& p, const Chunking& chunking, acc_t* partials) {
  at::parallel_for(0, chunking.count, chunks_per_task(chunking, p.latent),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    LatentBuffers<acc_t> buffers;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* partial = partials + chunk * p.latent;
      for (int64_t b = chunking.begin(chunk); b < chunking.end(chunk, p.batch); ++b) {
        for (int64_t j0 = 0; j0 < p.latent; j0 += kTile) {
          const int64_t n = std::min(kTile, p.latent - j0);
          const LatentTiles<acc_t> tiles = buffers.load(p, b, j0, n);
          vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
            using T = typename decltype(width)::type;
            T kl, grad_mu, grad_logvar, grad_prior_logvar;
            kl_element(tiles, i, kl, grad_mu, grad_logvar, grad_prior_logvar);
            store_as(load_as<T>(partial + j0 + i) + kl, partial + j0 + i);
          });
        }
      }
    }
  });
}

// Fills kl[b], kl_term[b] and the latent gradients, with `weights[b]` = beta * w_b and
// `active[j]` 1 or 0 (free bits) or null. A prior broadcast over B has its gradients summed per
// chunk into prior_partials [chunks, 2 * d] (prior_mu then prior_logvar).
template <typename acc_t>
void kl_rows(const KlProblem& p, const acc_t* weights, const acc_t* active, acc_t inactive_total,
             const Chunking& chunking, acc_t* kl, acc_t* kl_term, acc_t* prior_partials) {
  const int64_t latent = p.latent;
  at::parallel_for(0, chunking.count, chunks_per_task(chunking, latent),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    LatentBuffers<acc_t> buffers;
    alignas(64) acc_t grad_buffers[4][kTile];
    MutableData targets[4] = {p.grad_mu, p.grad_logvar, p.grad_prior_mu, p.grad_prior_logvar};
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      for (int64_t b = chunking.begin(chunk); b < chunking.end(chunk, p.batch); ++b) {
        const acc_t weight = weights[b];
        double kl_total = 0, active_total = 0;
        for (int64_t j0 = 0; j0 < latent; j0 += kTile) {
          const int64_t n = std::min(kTile, latent - j0);
          const LatentTiles<acc_t> tiles = buffers.load(p, b, j0, n);
          acc_t* grads[4] = {};
          void* destinations[4] = {};
          for (int g = 0; g < 4; ++g) {
            if (!targets[g].data) continue;
            const bool prior = g >= 2;
            if (prior && !p.prior_per_row) {
              grads[g] = prior_partials + chunk * 2 * latent + (g - 2) * latent + j0;
            } else {
              destinations[g] = advance(targets[g].data, targets[g].type, b * latent + j0);
              grads[g] = tile_target(destinations[g], targets[g].type, grad_buffers[g]);
            }
          }
          const bool accumulate_prior = !p.prior_per_row;
          using Vec = at::vec::Vectorized<acc_t>;
          Vec kl_vector(acc_t(0)), active_vector(acc_t(0));
          acc_t kl_scalar = 0, active_scalar = 0;
          const auto element = [&](int64_t i, auto& kl_sum, auto& active_sum) {
            using T = std::decay_t<decltype(kl_sum)>;
            T value, grad_mu, grad_logvar, grad_prior_logvar;
            kl_element(tiles, i, value, grad_mu, grad_logvar, grad_prior_logvar);
            kl_sum = kl_sum + value;
            T scale(weight);
            if (active) {
              const T is_active = load_as<T>(active + j0 + i);
              active_sum = active_sum + value * is_active;
              scale = scale * is_active;
            }
            if (grads[0]) store_as(grad_mu * scale, grads[0] + i);
            if (grads[1]) store_as(grad_logvar * scale, grads[1] + i);
            const T prior_grads[2] = {(T(0) - grad_mu) * scale, grad_prior_logvar * scale};
            for (int g = 2; g < 4; ++g) {
              if (!grads[g]) continue;
              store_as(accumulate_prior ? load_as<T>(grads[g] + i) + prior_grads[g - 2]
                                        : prior_grads[g - 2],
                       grads[g] + i);
            }
          };
          int64_t i = 0;
          for (; i + Vec::size() <= n; i += Vec::size()) element(i, kl_vector, active_vector);
          for (; i < n; ++i) element(i, kl_scalar, active_scalar);
          kl_total += sum_lanes(kl_vector) + kl_scalar;
          active_total += sum_lanes(active_vector) + active_scalar;
          for (int g = 0; g < 4; ++g) {
            if (destinations[g]) store_tile(grads[g], n, destinations[g], targets[g].type);
          }
        }
        kl[b] = static_cast<acc_t>(kl_total);
        kl_term[b] = active ? static_cast<acc_t>(active_total) + inactive_total : kl[b];
      }
    }
  });
}

template <typename acc_t>
void kl_pass(const KlProblem& p, const acc_t* weights, acc_t* kl, acc_t* kl_term,
             const at::TensorOptions& options) {
  const Chunking chunking = chunk_batch(p.batch);
  const auto acc_options = options.dtype(scalar_type_of<acc_t>());
  at::Tensor active;
  acc_t inactive_total = 0;
  if (p.free_bits > 0) {
    at::Tensor partials = at::zeros({chunking.count, p.latent}, acc_options);
    kl_column_sums<acc_t>(p, chunking, partials.mutable_data_ptr<acc_t>());
    active = at::empty({p.latent}, acc_options);
    reduce_partials<acc_t>(partials, {active.mutable_data_ptr(), active.scalar_type()});
    acc_t* flags = active.mutable_data_ptr<acc_t>();
    const acc_t free_bits = static_cast<acc_t>(p.free_bits);
    acc_t inactive_count = 0;
    for (int64_t j = 0; j < p.latent; ++j) {
      const acc_t batch_mean = flags[j] / static_cast<acc_t>(p.batch);
      flags[j] = batch_mean >= free_bits ? acc_t(1) : acc_t(0);
      inactive_count += acc_t(1) - flags[j];
    }
    inactive_total = inactive_count * free_bits;
  }
  const bool reduce_prior = !p.prior_per_row && (p.grad_prior_mu.data || p.grad_prior_logvar.data);
  at::Tensor prior_partials;
  if (reduce_prior) prior_partials = at::zeros({chunking.count, 2 * p.latent}, acc_options);
  kl_rows<acc_t>(p, weights, active.defined() ? active.const_data_ptr<acc_t>() : nullptr,
                 inactive_total, chunking, kl, kl_term,
                 reduce_prior ? prior_partials.mutable_data_ptr<acc_t>() : nullptr);
  if (reduce_prior) {
    at::Tensor totals = at::empty({2 * p.latent}, acc_options);
    reduce_partials<acc_t>(prior_partials, {totals.mutable_data_ptr(), totals.scalar_type()});
    const MutableData targets[2] = {p.grad_prior_mu, p.grad_prior_logvar};
    for (int g = 0; g < 2; ++g) {
      if (targets[g].data) {
        store_tile(totals.const_data_ptr<acc_t>() + g * p.latent, p.latent, targets[g].data,
                   targets[g].type);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// The op
// ------------------------------------------------------------------------------------------
void check_input(const char* name, const at::Tensor& tensor, int64_t dims) {
  TORCH_CHECK(tensor.dim() == dims && tensor.is_contiguous() && tensor.is_floating_point() &&
                  tensor.is_cpu(),
              "fastvae_native::elbo: ", name, " must be a contiguous ", dims,
              "-D floating CPU tensor, got ", tensor.sizes(), " ", tensor.scalar_type(), " on ",
              tensor.device());
}

void check_size(const char* name, const at::Tensor& tensor, int64_t dim, int64_t size, bool broadcast) {
  const int64_t actual = tensor.size(dim);
  TORCH_CHECK(actual == size || (broadcast && actual == 1), "fastvae_native::elbo: ", name,
              " has size ", actual, " in dim ", dim, ", expected ", size,
              broadcast ? " or 1" : "", " (shape ", tensor.sizes(), ")");
}

template <typename acc_t>
void elbo_kernel(const NllProblem& nll_problem, const KlProblem& kl_problem, const at::Tensor& beta,
                 const std::optional<at::Tensor>& grad_scale, std::string_view reduction,
                 at::Tensor& loss, at::Tensor& nll, at::Tensor& kl, at::Tensor& kl_term) {
  const int64_t batch = nll_problem.batch;
  const auto options = nll.options();
  // Read from memory, so the kernel dispatches no host-read op.
  acc_t converted_beta;
  const acc_t beta_value = *load_tile(beta.const_data_ptr(), beta.scalar_type(), 1, &converted_beta);
  at::Tensor weights = grad_scale.has_value()
                           ? grad_scale->to(scalar_type_of<acc_t>()).contiguous()
                           : at::full({batch}, reduction == "mean" ? 1.0 / batch : 1.0, options);
  at::Tensor kl_weights = weights * beta_value;
  nll_pass<acc_t>(nll_problem, weights.const_data_ptr<acc_t>(), nll.mutable_data_ptr<acc_t>(), options);
  kl_pass<acc_t>(kl_problem, kl_weights.const_data_ptr<acc_t>(), kl.mutable_data_ptr<acc_t>(),
                 kl_term.mutable_data_ptr<acc_t>(), options);

  const acc_t* nll_data = nll.const_data_ptr<acc_t>();
  const acc_t* kl_term_data = kl_term.const_data_ptr<acc_t>();
  if (reduction == "none") {
    acc_t* rows = loss.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < batch; ++b) rows[b] = nll_data[b] + beta_value * kl_term_data[b];
    return;
  }
  double total = 0;  // O(B) in order: deterministic, and double keeps large batches exact enough
  for (int64_t b = 0; b < batch; ++b) total += nll_data[b] + beta_value * kl_term_data[b];
  if (reduction == "mean") total /= static_cast<double>(batch);
  *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
}

}  // namespace

ElboOutputs elbo_cpu(const at::Tensor& x, const at::Tensor& x_hat,
                     const std::optional<at::Tensor>& x_logvar, double x_logvar_const,
                     const at::Tensor& mu, const at::Tensor& logvar,
                     const std::optional<at::Tensor>& prior_mu,
                     const std::optional<at::Tensor>& prior_logvar, const at::Tensor& beta,
                     double free_bits, bool bernoulli, std::string_view reduction,
                     const std::optional<at::Tensor>& grad_scale, std::array<bool, 7> needs_grad) {
  TORCH_CHECK(reduction == "none" || reduction == "mean" || reduction == "sum",
              "fastvae_native::elbo: reduction must be 'none', 'mean' or 'sum', got '", reduction, "'");
  check_input("x", x, 2);
  check_input("x_hat", x_hat, 3);
  check_input("mu", mu, 2);
  check_input("logvar", logvar, 2);
  const int64_t samples = x_hat.size(0), batch = x.size(0), features = x.size(1);
  const int64_t latent = mu.size(1);
  check_size("x_hat", x_hat, 1, batch, false);
  check_size("x_hat", x_hat, 2, features, false);
  TORCH_CHECK(mu.size(0) == batch && logvar.sizes() == mu.sizes() &&
                  logvar.scalar_type() == mu.scalar_type(),
              "fastvae_native::elbo: mu and logvar must both be [", batch, ", d] of one dtype, got ",
              mu.sizes(), " ", mu.scalar_type(), " and ", logvar.sizes(), " ", logvar.scalar_type());
  if (x_logvar.has_value()) {
    check_input("x_logvar", *x_logvar, 3);
    check_size("x_logvar", *x_logvar, 0, samples, true);
    check_size("x_logvar", *x_logvar, 1, batch, true);
    check_size("x_logvar", *x_logvar, 2, features, true);
  }
  TORCH_CHECK(prior_mu.has_value() == prior_logvar.has_value(),
              "fastvae_native::elbo: give both prior_mu and prior_logvar or neither");
  if (prior_mu.has_value()) {
    for (const auto& [name, prior] : {std::pair{"prior_mu", &*prior_mu}, std::pair{"prior_logvar", &*prior_logvar}}) {
      check_input(name, *prior, 2);
      check_size(name, *prior, 0, batch, true);
      check_size(name, *prior, 1, latent, false);
      TORCH_CHECK(prior->scalar_type() == mu.scalar_type(), "fastvae_native::elbo: ", name,
                  " must have mu's dtype ", mu.scalar_type(), ", got ", prior->scalar_type());
    }
    TORCH_CHECK(prior_mu->size(0) == prior_logvar->size(0),
                "fastvae_native::elbo: prior_mu and prior_logvar must have the same shape");
  }
  TORCH_CHECK(beta.numel() == 1 && beta.is_cpu(), "fastvae_native::elbo: beta must be a one-element CPU tensor");
  TORCH_CHECK(free_bits >= 0, "fastvae_native::elbo: free_bits must be >= 0, got ", free_bits);
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->dim() == 1 && grad_scale->size(0) == batch && grad_scale->is_cpu(),
                "fastvae_native::elbo: grad_scale must be a [", batch, "] CPU tensor, got ",
                grad_scale->sizes());
  }

  const bool double_accumulation =
      x.scalar_type() == at::kDouble || x_hat.scalar_type() == at::kDouble ||
      (x_logvar.has_value() && x_logvar->scalar_type() == at::kDouble) || mu.scalar_type() == at::kDouble;
  const auto acc_options = x.options().dtype(double_accumulation ? at::kDouble : at::kFloat);
  at::Tensor loss = reduction == "none" ? at::empty({batch}, acc_options) : at::empty({}, acc_options);
  at::Tensor nll = at::empty({batch}, acc_options);
  at::Tensor kl = at::empty({batch}, acc_options);
  at::Tensor kl_term = at::empty({batch}, acc_options);

  const std::optional<at::Tensor> inputs[kInputCount] = {x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar};
  std::array<at::Tensor, kInputCount> grads;
  for (int i = 0; i < kInputCount; ++i) {
    const bool wanted = needs_grad[i] && inputs[i].has_value();
    TORCH_CHECK(!(needs_grad[i] && !inputs[i].has_value()),
                "fastvae_native::elbo: needs_grad[", i, "] is set for an absent input");
    grads[i] = wanted ? at::empty_like(*inputs[i]) : at::empty({0}, x.options());
    advise_huge_pages(grads[i]);
  }
  const auto data = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? Data{t->const_data_ptr(), t->scalar_type()} : Data{};
  };
  const auto target = [&](int i) {
    return needs_grad[i] ? MutableData{grads[i].mutable_data_ptr(), grads[i].scalar_type()}
                         : MutableData{};
  };

  NllProblem nll_problem{samples, batch, features, data(x), data(x_hat), data(x_logvar)};
  if (x_logvar.has_value()) {
    nll_problem.logvar_samples = x_logvar->size(0);
    nll_problem.logvar_batch = x_logvar->size(1);
    nll_problem.logvar_features = x_logvar->size(2);
  }
  nll_problem.logvar_constant = x_logvar_const;
  nll_problem.bernoulli = bernoulli;
  nll_problem.grad_x = target(kX);
  nll_problem.grad_x_hat = target(kXHat);
  nll_problem.grad_x_logvar = target(kXLogvar);
  nll_problem.stream_outputs = x_hat.nbytes() >= kStreamingBytes;

  KlProblem kl_problem{batch, latent, data(mu), data(logvar), data(prior_mu), data(prior_logvar)};
  kl_problem.prior_per_row = !prior_mu.has_value() || prior_mu->size(0) == batch;
  kl_problem.free_bits = free_bits;
  kl_problem.grad_mu = target(kMu);
  kl_problem.grad_logvar = target(kLogvar);
  kl_problem.grad_prior_mu = target(kPriorMu);
  kl_problem.grad_prior_logvar = target(kPriorLogvar);

  if (double_accumulation) {
    elbo_kernel<double>(nll_problem, kl_problem, beta, grad_scale, reduction, loss, nll, kl, kl_term);
  } else {
    elbo_kernel<float>(nll_problem, kl_problem, beta, grad_scale, reduction, loss, nll, kl, kl_term);
  }
  return {loss, nll, kl, kl_term, grads[0], grads[1], grads[2], grads[3], grads[4], grads[5], grads[6]};
}

FASTVAE_NAMESPACE_END
