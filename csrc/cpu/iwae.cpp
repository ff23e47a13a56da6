// The importance-weighted bound on the CPU. Per row b, sweep 1 forms every sample's log weight
// (the NLL over D with nll_worker.h's tile code, the density ratio over d) and their
// log-sum-exp online (a running maximum and sum: S may be large, so nothing per sample lives on
// the stack); sweep 2, only when a gradient is wanted, re-reads the row's samples (in cache for
// moderate S·D) and writes the gradients with the sample weights a[s] = ω_b·w̃[s]. No
// [S, B, D] temporary. Sums across rows (θ or a prior shared by the batch) are formed per chunk
// and added in chunk order, so results do not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../elementwise.h"
#include "../iwae_args.h"
#include "huge_pages.h"
#include "kernels.h"
#include "latent_tiles.h"
#include "nll_worker.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

static_assert(IwaeSlot::kX == kX && IwaeSlot::kXHat == kXHat &&
                  IwaeSlot::kXLogScale == kXLogScale,
              "nll_problem reads the decoder slots of elbo and iwae alike");

// The samples z [S, B, d] with their gradient, and the latents of q(z|x) and of the prior.
struct SampleProblem {
  KlProblem latents;
  int64_t samples;
  Data z;
  MutableData grad_z;

  bool wants_gradients() const {
    bool wanted = grad_z.data != nullptr;
    for (const MutableData& grad : latents.grads) wanted = wanted || grad.data;
    return wanted;
  }
};

// The latent terms of a row's samples, a tile of d at a time: the row's mu, logvar, prior and
// their inverse variances are loaded once per tile, then each sample's z.
template <typename acc_t>
class LatentSweeps {
 public:
  explicit LatentSweeps(const SampleProblem& p) : p_(p) {
    std::fill(zeros_, zeros_ + kTile, acc_t(0));
    std::fill(ones_, ones_ + kTile, acc_t(1));
  }

  // sums[s] += Σ_d log p(z) − log q(z|x) for each sample s of row b.
  void ratio_sums(int64_t b, double* sums) {
    for (int64_t j0 = 0; j0 < latent(); j0 += kTile) {
      const int64_t n = std::min(kTile, latent() - j0);
      load_row(b, j0, n);
      for (int64_t s = 0; s < p_.samples; ++s) {
        const acc_t* z = load_z(s, b, j0, n);
        sums[s] += vectorized_sum<acc_t>(n, [&](int64_t i, auto width) {
          return terms<typename decltype(width)::type>(z, i).ratio;
        });
      }
    }
  }

  // Row b's latent gradients, sample s weighted weights[s] (z_weights[s] in z's gradient).
  // prior_partials: this chunk's sums [d] of a shared prior's two gradients.
  void gradients(int64_t b, const acc_t* weights, const acc_t* z_weights,
                 acc_t* const* prior_partials) {
    for (int64_t j0 = 0; j0 < latent(); j0 += kTile) {
      const int64_t n = std::min(kTile, latent() - j0);
      load_row(b, j0, n);
      for (acc_t* sums : grad_sums_) std::fill(sums, sums + n, acc_t(0));
      for (int64_t s = 0; s < p_.samples; ++s) sample_gradients(s, b, j0, n, weights[s], z_weights[s]);
      store_row_gradients(b, j0, n, prior_partials);
    }
  }

 private:
  int64_t latent() const { return p_.latents.latent; }

  // Tile (b, j0) of the latents, with e^-logvar and e^-prior_logvar; the standard normal prior
  // as m = v = 0, e^-v = 1.
  void load_row(int64_t b, int64_t j0, int64_t n) {
    tiles_ = buffers_.load(p_.latents, b, j0, n);
    const bool prior = tiles_.prior_mu != nullptr;
    vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      store_as(inverse_scale(load_as<T>(tiles_.logvar + i)), inv_var_ + i);
      if (prior) store_as(inverse_scale(load_as<T>(tiles_.prior_logvar + i)), prior_inv_var_ + i);
    });
    if (!prior) tiles_.prior_mu = tiles_.prior_logvar = zeros_;
    prior_inv_ = prior ? prior_inv_var_ : ones_;
  }

  const acc_t* load_z(int64_t s, int64_t b, int64_t j0, int64_t n) {
    const int64_t offset = (s * p_.latents.batch + b) * latent() + j0;
    return load_tile(advance(p_.z.data, p_.z.type, offset), p_.z.type, n, z_buffer_);
  }

  template <typename T>
  DensityRatioTerms<T> terms(const acc_t* z, int64_t i) const {
    return density_ratio_terms(load_as<T>(z + i), load_as<T>(tiles_.mu + i),
                               load_as<T>(tiles_.logvar + i), load_as<T>(inv_var_ + i),
                               load_as<T>(tiles_.prior_mu + i), load_as<T>(tiles_.prior_logvar + i),
                               load_as<T>(prior_inv_ + i));
  }

  // z's gradient for sample s (written), the others' terms weighted and added to grad_sums_.
  void sample_gradients(int64_t s, int64_t b, int64_t j0, int64_t n, acc_t weight,
                        acc_t z_weight) {
    const acc_t* z = load_z(s, b, j0, n);
    void* z_target = p_.grad_z.data ? advance(p_.grad_z.data, p_.grad_z.type,
                                              (s * p_.latents.batch + b) * latent() + j0)
                                    : nullptr;
    acc_t* grad_z = z_target ? tile_target(z_target, p_.grad_z.type, grad_z_buffer_) : nullptr;
    vectorized_for<acc_t>(n, [&](int64_t i, auto width) {
      using T = typename decltype(width)::type;
      const DensityRatioTerms<T> t = terms<T>(z, i);
      const T w(weight);
      if (grad_z) store_as(t.grad_z * T(z_weight), grad_z + i);
      const T weighted[4] = {t.grad_mu * w, t.grad_logvar * w, t.grad_prior_mu * w,
                             t.grad_prior_logvar * w};
      for (int g = 0; g < 4; ++g) store_as(load_as<T>(grad_sums_[g] + i) + weighted[g], grad_sums_[g] + i);
    });
    if (z_target) store_tile(grad_z, n, z_target, p_.grad_z.type);
  }

  // The tile's sums over samples: to row b of mu's, logvar's and a per-row prior's gradients,
  // or added to the chunk's partial sums of a shared prior's.
  void store_row_gradients(int64_t b, int64_t j0, int64_t n, acc_t* const* prior_partials) {
    const KlProblem& q = p_.latents;
    for (int g = 0; g < 4; ++g) {
      if (!q.grads[g].data) continue;
      if (g >= 2 && !q.prior_per_row) {
        acc_t* partial = prior_partials[g - 2] + j0;
        for (int64_t i = 0; i < n; ++i) partial[i] += grad_sums_[g][i];
      } else {
        store_tile(grad_sums_[g], n, advance(q.grads[g].data, q.grads[g].type, b * latent() + j0),
                   q.grads[g].type);
      }
    }
  }

  const SampleProblem& p_;
  LatentBuffers<acc_t> buffers_;
  LatentTiles<acc_t> tiles_{};
  const acc_t* prior_inv_ = nullptr;
  alignas(64) acc_t inv_var_[kTile];
  alignas(64) acc_t prior_inv_var_[kTile];
  alignas(64) acc_t zeros_[kTile];
  alignas(64) acc_t ones_[kTile];
  alignas(64) acc_t z_buffer_[kTile];
  alignas(64) acc_t grad_z_buffer_[kTile];
  alignas(64) acc_t grad_sums_[4][kTile];  // Σ_s of mu's, logvar's, prior_mu's, prior_logvar's
};

// One call, as the rows see it.
template <typename acc_t>
struct IwaeProblem {
  NllProblem decoder;       // x, x_hat, θ and their gradients (sweep 2)
  NllProblem decoder_sums;  // the same without gradients (sweep 1)
  SampleProblem encoder;   // z and q(z|x)'s mu, logvar, with the prior
  Data offset, grad_scale;  // log_weight_offset [S, B] and ω [B]; null: zero, uniform
  MutableData grad_offset;
  acc_t uniform_weight;
  bool dreg, wants_gradients;
  acc_t* log_weights;           // [S, B], the output
  acc_t* loss_rows;             // [B]: log S − logsumexp_s log_weights[s, b]
  acc_t* prior_partials[2] = {};  // [chunks, d] each, for a prior shared by the batch
};

// Element `index` of `source` as acc_t.
template <typename acc_t>
acc_t read_one(Data source, int64_t index) {
  acc_t value;
  return *load_tile(advance(source.data, source.type, index), source.type, 1, &value);
}

// The rows of the chunks one parallel task was given, with that task's buffers.
template <typename acc_t, typename Nll, bool kElementScale>
class IwaeWorker {
 public:
  explicit IwaeWorker(const IwaeProblem<acc_t>& p)
      : p_(p), sums_(p.decoder_sums), gradients_(p.decoder), latents_(p.encoder),
        nll_(p.encoder.samples), ratio_(p.encoder.samples), log_weights_(p.encoder.samples),
        weights_(p.encoder.samples), z_weights_(p.encoder.samples) {}

  void run(const Chunking& chunking, int64_t chunk, acc_t* scale_partials) {
    acc_t* const scale_partial = p_.decoder.chunk_partial(scale_partials, chunk);
    const int64_t latent = p_.encoder.latents.latent;
    acc_t* const prior_partials[2] = {
        p_.prior_partials[0] ? p_.prior_partials[0] + chunk * latent : nullptr,
        p_.prior_partials[1] ? p_.prior_partials[1] + chunk * latent : nullptr};
    const double log_samples = std::log(static_cast<double>(samples()));
    for (int64_t b = chunking.begin(chunk); b < chunking.end(chunk, p_.decoder.batch); ++b) {
      const double log_total = log_weights(b);
      p_.loss_rows[b] = static_cast<acc_t>(log_samples - log_total);
      if (p_.wants_gradients) gradients(b, log_total, scale_partial, prior_partials);
    }
  }

 private:
  int64_t samples() const { return p_.encoder.samples; }

  // Sweep 1: row b's log weights, to the output and log_weights_; returns their log-sum-exp.
  double log_weights(int64_t b) {
    std::fill(nll_.begin(), nll_.end(), 0.0);
    std::fill(ratio_.begin(), ratio_.end(), 0.0);
    sums_.row(b, nullptr, {}, nll_.data());
    latents_.ratio_sums(b, ratio_.data());
    OnlineLogSumExp<double> total;
    const int64_t batch = p_.decoder.batch;
    for (int64_t s = 0; s < samples(); ++s) {
      const acc_t offset = p_.offset.data ? read_one<acc_t>(p_.offset, s * batch + b) : acc_t(0);
      const acc_t value = static_cast<acc_t>(ratio_[s] - nll_[s]) + offset;
      log_weights_[s] = value;
      p_.log_weights[s * batch + b] = value;
      total.add(value);
    }
    return total.total();
  }

  // Sweep 2: the sample weights a[s] = ω_b·w̃[s] (ω_b·w̃[s]² for z under DReG), the offset's
  // gradient −a, then the decoder's and the latents' gradients.
  void gradients(int64_t b, double log_total, acc_t* scale_partial, acc_t* const* prior_partials) {
    const acc_t row_weight = p_.grad_scale.data ? read_one<acc_t>(p_.grad_scale, b) : p_.uniform_weight;
    for (int64_t s = 0; s < samples(); ++s) {
      const acc_t normalised = static_cast<acc_t>(std::exp(log_weights_[s] - log_total));
      weights_[s] = row_weight * normalised;
      z_weights_[s] = p_.dreg ? weights_[s] * normalised : weights_[s];
      if (p_.grad_offset.data) {
        const acc_t minus_weight = -weights_[s];
        store_tile(&minus_weight, 1,
                   advance(p_.grad_offset.data, p_.grad_offset.type, s * p_.decoder.batch + b),
                   p_.grad_offset.type);
      }
    }
    if (p_.decoder.wants_gradients()) gradients_.row(b, scale_partial, {weights_.data(), 1}, nullptr);
    if (p_.encoder.wants_gradients()) {
      latents_.gradients(b, weights_.data(), z_weights_.data(), prior_partials);
    }
  }

  const IwaeProblem<acc_t>& p_;
  NllWorker<acc_t, Nll, kElementScale, NllForm::kSampleSums> sums_;
  NllWorker<acc_t, Nll, kElementScale, NllForm::kGradients> gradients_;
  LatentSweeps<acc_t> latents_;
  // Per sample of the row in progress (S may be large: on the heap).
  std::vector<double> nll_, ratio_, log_weights_;
  std::vector<acc_t> weights_, z_weights_;
};

template <typename acc_t, typename Nll, bool kElementScale>
void iwae_rows(const IwaeProblem<acc_t>& p, acc_t* scale_partials) {
  const Chunking chunking = chunk_batch(p.decoder.batch);
  const int64_t row_elements = p.decoder.samples * (p.decoder.features + p.encoder.latents.latent);
  at::parallel_for(0, chunking.count, chunks_per_task(chunking, row_elements),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    IwaeWorker<acc_t, Nll, kElementScale> worker(p);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      worker.run(chunking, chunk, scale_partials);
    }
    stream_fence();
  });
}

template <typename acc_t>
IwaeProblem<acc_t> iwae_problem(const IwaeArgs& args, const IwaeOutputs& out) {
  IwaeProblem<acc_t> p;
  p.decoder = nll_problem(args, out);
  p.decoder_sums = p.decoder.without_gradients();
  p.encoder = {kl_problem(args, out, IwaeSlot::kMu), args.samples, data_of(args.z),
               gradient_of(args, out, IwaeSlot::kZ)};
  p.offset = data_of(args.log_weight_offset);
  p.grad_scale = data_of(args.grad_scale);
  p.grad_offset = gradient_of(args, out, IwaeSlot::kLogWeightOffset);
  p.uniform_weight = static_cast<acc_t>(args.uniform_weight());
  p.dreg = args.dreg;
  p.wants_gradients = std::any_of(args.needs_grad.begin(), args.needs_grad.end(),
                                  [](bool need) { return need; });
  p.log_weights = out.log_weights.mutable_data_ptr<acc_t>();
  return p;
}

// The reduced loss from the per-row losses, summed in row order in double (deterministic).
template <typename acc_t>
void reduce_loss(const IwaeArgs& args, const at::Tensor& rows, const at::Tensor& loss) {
  if (args.reduction == Reduction::kNone) return;  // rows is the loss
  const acc_t* values = rows.const_data_ptr<acc_t>();
  double total = 0;
  for (int64_t b = 0; b < args.batch; ++b) total += values[b];
  if (args.reduction == Reduction::kMean) total /= static_cast<double>(args.batch);
  *loss.mutable_data_ptr<acc_t>() = static_cast<acc_t>(total);
}

template <typename acc_t>
void iwae_kernel(const IwaeArgs& args, const IwaeOutputs& out) {
  IwaeProblem<acc_t> p = iwae_problem<acc_t>(args, out);
  const auto options = out.log_weights.options();
  const at::Tensor rows =
      args.reduction == Reduction::kNone ? out.loss : at::empty({args.batch}, options);
  p.loss_rows = rows.mutable_data_ptr<acc_t>();
  const KlProblem& latents = p.encoder.latents;
  const bool reduce_prior = !latents.prior_per_row && (latents.grads[2].data || latents.grads[3].data);
  at::Tensor prior_partials[2];
  for (int g = 0; g < 2 && reduce_prior; ++g) {
    prior_partials[g] = at::zeros({chunk_batch(args.batch).count, args.latent}, options);
    p.prior_partials[g] = prior_partials[g].mutable_data_ptr<acc_t>();
  }
  run_nll_kind<acc_t>(args.likelihood, p.decoder, options, [&](auto kind, acc_t* partials) {
    using Kind = decltype(kind);
    iwae_rows<acc_t, typename Kind::Nll, Kind::kElementScale>(p, partials);
  });
  for (int g = 2; g < 4 && reduce_prior; ++g) {
    if (latents.grads[g].data) reduce_partials<acc_t>(prior_partials[g - 2], latents.grads[g]);
  }
  reduce_loss<acc_t>(args, rows, out.loss);
}

}  // namespace

IwaeOutputs iwae_cpu(const IwaeArgs& args) {
  IwaeOutputs out = allocate_iwae_outputs(args);
  for (const at::Tensor& grad : out.grads) advise_huge_pages(grad);
  with_accumulation(args.accumulation, [&](auto acc) { iwae_kernel<decltype(acc)>(args, out); });
  return out;
}

FASTVAE_NAMESPACE_END
