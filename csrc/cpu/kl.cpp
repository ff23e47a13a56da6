// The KL pass on the CPU: mu, logvar [B, d]; prior_mu, prior_logvar [Bp, d] (Bp 1 or B) or the
// standard normal. Forms kl[b], the free-bits kl_term[b] and the latent gradients; with a KL
// capacity C, kl_term[b] = |KL_fb[b] - C| and the gradients of row b take sign(KL_fb[b] - C),
// known only once the row is summed: a pre-pass without gradient targets forms KL_fb first.
#include "../elementwise.h"
#include "latent_tiles.h"
#include "loops.h"
#include "passes.h"
#include "vec_math_ops.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

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

// Free bits: active[j] = 1 where the batch mean of KL_bj reaches free_bits, else 0; returns
// the inactive dims' constant contribution to every row's kl_term.
template <typename acc_t>
acc_t free_bits_mask(const KlProblem& p, double free_bits, const Chunking& chunking,
                     at::Tensor& active) {
  at::Tensor partials = at::zeros({chunking.count, p.latent}, active.options());
  kl_column_sums<acc_t>(p, chunking, partials.mutable_data_ptr<acc_t>());
  reduce_partials<acc_t>(partials, {active.mutable_data_ptr(), active.scalar_type()});
  acc_t* flags = active.mutable_data_ptr<acc_t>();
  const acc_t threshold = static_cast<acc_t>(free_bits);
  acc_t inactive_count = 0;
  for (int64_t j = 0; j < p.latent; ++j) {
    const acc_t batch_mean = flags[j] / static_cast<acc_t>(p.batch);
    flags[j] = batch_mean >= threshold ? acc_t(1) : acc_t(0);
    inactive_count += acc_t(1) - flags[j];
  }
  return inactive_count * threshold;
}

// The rows of the chunks one parallel task was given. A prior broadcast over B has its
// gradients summed per chunk into prior_partials [chunks, 2 * d] (prior_mu then prior_logvar).
template <typename acc_t>
class KlWorker {
 public:
  KlWorker(const KlProblem& p, const acc_t* weights, const acc_t* active, acc_t inactive_total,
           acc_t* prior_partials)
      : p_(p), weights_(weights), active_(active), inactive_total_(inactive_total),
        prior_partials_(prior_partials) {}

  void run(const Chunking& chunking, int64_t chunk, acc_t* kl, acc_t* kl_term) {
    for (int64_t b = chunking.begin(chunk); b < chunking.end(chunk, p_.batch); ++b) {
      double kl_total = 0, active_total = 0;
      for (int64_t j0 = 0; j0 < p_.latent; j0 += kTile) {
        tile(chunk, b, j0, std::min(kTile, p_.latent - j0), kl_total, active_total);
      }
      kl[b] = static_cast<acc_t>(kl_total);
      kl_term[b] = active_ ? static_cast<acc_t>(active_total) + inactive_total_ : kl[b];
    }
  }

 private:
  // Where tile (b, j0)'s gradients are computed: the output itself or a buffer (its destination
  // then set), or for a shared prior this chunk's partial sums.
  void set_targets(int64_t chunk, int64_t b, int64_t j0) {
    for (int g = 0; g < 4; ++g) {
      grads_[g] = nullptr;
      destinations_[g] = nullptr;
      if (!p_.grads[g].data) continue;
      if (g >= 2 && !p_.prior_per_row) {
        grads_[g] = prior_partials_ + (chunk * 2 + g - 2) * p_.latent + j0;
      } else {
        destinations_[g] = advance(p_.grads[g].data, p_.grads[g].type, b * p_.latent + j0);
        grads_[g] = tile_target(destinations_[g], p_.grads[g].type, grad_buffers_[g]);
      }
    }
  }

  void tile(int64_t chunk, int64_t b, int64_t j0, int64_t n, double& kl_total,
            double& active_total) {
    const LatentTiles<acc_t> tiles = buffers_.load(p_, b, j0, n);
    set_targets(chunk, b, j0);
    using Vec = at::vec::Vectorized<acc_t>;
    Vec kl_vector(acc_t(0)), active_vector(acc_t(0));
    acc_t kl_scalar = 0, active_scalar = 0;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) element(tiles, b, j0, i, kl_vector, active_vector);
    for (; i < n; ++i) element(tiles, b, j0, i, kl_scalar, active_scalar);
    kl_total += sum_lanes(kl_vector) + kl_scalar;
    active_total += sum_lanes(active_vector) + active_scalar;
    for (int g = 0; g < 4; ++g) {
      if (destinations_[g]) store_tile(grads_[g], n, destinations_[g], p_.grads[g].type);
    }
  }

  template <typename T>
  void element(const LatentTiles<acc_t>& tiles, int64_t b, int64_t j0, int64_t i, T& kl_sum,
               T& active_sum) {
    T value, grad_mu, grad_logvar, grad_prior_logvar;
    kl_element(tiles, i, value, grad_mu, grad_logvar, grad_prior_logvar);
    kl_sum = kl_sum + value;
    T scale(weights_[b]);
    if (active_) {
      const T is_active = load_as<T>(active_ + j0 + i);
      active_sum = active_sum + value * is_active;
      scale = scale * is_active;
    }
    if (grads_[0]) store_as(grad_mu * scale, grads_[0] + i);
    if (grads_[1]) store_as(grad_logvar * scale, grads_[1] + i);
    const T prior_grads[2] = {(T(0) - grad_mu) * scale, grad_prior_logvar * scale};
    for (int g = 2; g < 4; ++g) {
      if (!grads_[g]) continue;
      store_as(p_.prior_per_row ? prior_grads[g - 2] : load_as<T>(grads_[g] + i) + prior_grads[g - 2],
               grads_[g] + i);
    }
  }

  const KlProblem& p_;
  const acc_t* weights_;
  const acc_t* active_;  // free-bits flags [d], or null
  acc_t inactive_total_;
  acc_t* prior_partials_;
  LatentBuffers<acc_t> buffers_;
  acc_t* grads_[4] = {};
  void* destinations_[4] = {};
  alignas(64) acc_t grad_buffers_[4][kTile];
};

template <typename acc_t>
void kl_rows(const KlProblem& p, const acc_t* weights, const acc_t* active, acc_t inactive_total,
             const Chunking& chunking, acc_t* kl, acc_t* kl_term, acc_t* prior_partials) {
  at::parallel_for(0, chunking.count, chunks_per_task(chunking, p.latent),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    KlWorker<acc_t> worker(p, weights, active, inactive_total, prior_partials);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) worker.run(chunking, chunk, kl, kl_term);
  });
}

// A prior shared by the batch: its gradients are the chunk partials summed in chunk order.
template <typename acc_t>
void store_prior_grads(const KlProblem& p, const at::Tensor& prior_partials) {
  at::Tensor totals = at::empty({2 * p.latent}, prior_partials.options());
  reduce_partials<acc_t>(prior_partials, {totals.mutable_data_ptr(), totals.scalar_type()});
  for (int g = 2; g < 4; ++g) {
    if (!p.grads[g].data) continue;
    store_tile(totals.const_data_ptr<acc_t>() + (g - 2) * p.latent, p.latent, p.grads[g].data,
               p.grads[g].type);
  }
}

bool wants_gradients(const KlProblem& p) {
  for (const MutableData& grad : p.grads) {
    if (grad.data) return true;
  }
  return false;
}

// The capacity pre-pass: kl and kl_term (= KL_fb) from a run of the pass without gradient
// targets, then row b's KL weight times sign(KL_fb[b] - C), for the pass proper.
template <typename acc_t>
at::Tensor signed_weights(const KlProblem& p, const acc_t* weights, const acc_t* active,
                          acc_t inactive_total, const Chunking& chunking, acc_t capacity,
                          acc_t* kl, acc_t* kl_term, const at::TensorOptions& options) {
  KlProblem sums_only = p;
  for (MutableData& grad : sums_only.grads) grad = {};
  kl_rows<acc_t>(sums_only, weights, active, inactive_total, chunking, kl, kl_term, nullptr);
  at::Tensor result = at::empty({p.batch}, options);
  acc_t* data = result.mutable_data_ptr<acc_t>();
  for (int64_t b = 0; b < p.batch; ++b) {
    data[b] = weights[b] * MathOps<acc_t>::sign(kl_term[b] - capacity);
  }
  return result;
}

}  // namespace

template <typename acc_t>
void kl_pass(const ElboArgs& args, const ElboOutputs& out, const acc_t* weights, acc_t* kl,
             acc_t* kl_term) {
  const KlProblem p = kl_problem(args, out);
  const Chunking chunking = chunk_batch(p.batch);
  const auto acc_options = out.kl.options();
  at::Tensor active;
  acc_t inactive_total = 0;
  if (args.free_bits > 0) {
    active = at::empty({p.latent}, acc_options);
    inactive_total = free_bits_mask<acc_t>(p, args.free_bits, chunking, active);
  }
  const acc_t* active_data = active.defined() ? active.const_data_ptr<acc_t>() : nullptr;
  const acc_t capacity = args.capacity ? read_scalar<acc_t>(*args.capacity) : acc_t(0);
  at::Tensor capacity_weights;  // without gradients to form, the sign is not needed
  if (args.capacity && wants_gradients(p)) {
    capacity_weights = signed_weights<acc_t>(p, weights, active_data, inactive_total, chunking,
                                             capacity, kl, kl_term, acc_options);
    weights = capacity_weights.const_data_ptr<acc_t>();
  }
  const bool reduce_prior = !p.prior_per_row && (p.grads[2].data || p.grads[3].data);
  at::Tensor prior_partials;
  if (reduce_prior) prior_partials = at::zeros({chunking.count, 2 * p.latent}, acc_options);
  kl_rows<acc_t>(p, weights, active_data, inactive_total, chunking, kl, kl_term,
                 reduce_prior ? prior_partials.mutable_data_ptr<acc_t>() : nullptr);
  if (reduce_prior) store_prior_grads<acc_t>(p, prior_partials);
  if (!args.capacity) return;
  for (int64_t b = 0; b < p.batch; ++b) kl_term[b] = MathOps<acc_t>::abs(kl_term[b] - capacity);
}

template void kl_pass<float>(const ElboArgs&, const ElboOutputs&, const float*, float*, float*);
template void kl_pass<double>(const ElboArgs&, const ElboOutputs&, const double*, double*,
                              double*);

FASTVAE_NAMESPACE_END
