// The latent tensors of a call on the CPU, read a tile at a time into the accumulation type;
// shared by the KL pass (kl.cpp) and the importance-weighted bound (iwae.cpp). mu, logvar
// [B, d]; prior_mu, prior_logvar [Bp, d] (Bp 1 or B) or the standard normal.
#pragma once

#include "passes.h"

FASTVAE_NAMESPACE_BEGIN

struct KlProblem {
  int64_t batch, latent;
  Data mu, logvar, prior_mu, prior_logvar;  // prior data null for the standard normal
  bool prior_per_row = true;
  MutableData grads[4];  // mu, logvar, prior_mu, prior_logvar; null where not wanted
};

// The latents of a call to elbo or iwae: mu_slot is mu's gradient slot, and logvar, prior_mu
// and prior_logvar follow it in both ops.
template <typename Args, typename Outputs>
KlProblem kl_problem(const Args& args, const Outputs& out, int mu_slot = kMu) {
  KlProblem p{args.batch, args.latent, data_of(args.mu), data_of(args.logvar),
              data_of(args.prior_mu), data_of(args.prior_logvar)};
  p.prior_per_row = !args.prior_mu || args.prior_mu->size(0) == args.batch;
  for (int g = 0; g < 4; ++g) p.grads[g] = gradient_of(args, out, mu_slot + g);
  return p;
}

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

FASTVAE_NAMESPACE_END
