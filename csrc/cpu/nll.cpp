// The NLL pass of the ELBO on the CPU: one pass over x, x_hat and x_log_scale forms the NLL of
// every row and writes the gradients of the three, every sample of row b weighted w_b / S
// (the tile code is nll_worker.h's).
#include "nll_worker.h"

FASTVAE_NAMESPACE_BEGIN
namespace {

template <typename acc_t, typename Nll, bool kElementScale>
void nll_rows(const NllProblem& p, const acc_t* weights, acc_t* nll, acc_t* partials) {
  const Chunking chunking = chunk_batch(p.batch);
  at::parallel_for(0, chunking.count, chunks_per_task(chunking, p.samples * p.features),
                   [&](int64_t chunk_begin, int64_t chunk_end) {
    NllWorker<acc_t, Nll, kElementScale, NllForm::kRowSumAndGradients> worker(p);
    const acc_t samples = static_cast<acc_t>(p.samples);
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      for (int64_t b = chunking.begin(chunk); b < chunking.end(chunk, p.batch); ++b) {
        const acc_t weight = weights[b] / samples;
        double total = 0;
        worker.row(b, p.chunk_partial(partials, chunk), {&weight, 0}, &total);
        nll[b] = static_cast<acc_t>(total) / samples;
      }
    }
    stream_fence();
  });
}

}  // namespace

template <typename acc_t>
void nll_pass(const ElboArgs& args, const ElboOutputs& out, const acc_t* weights, acc_t* nll) {
  const NllProblem p = nll_problem(args, out);
  run_nll_kind<acc_t>(args.likelihood, p, out.nll.options(), [&](auto kind, acc_t* partials) {
    using Kind = decltype(kind);
    nll_rows<acc_t, typename Kind::Nll, Kind::kElementScale>(p, weights, nll, partials);
  });
}

template void nll_pass<float>(const ElboArgs&, const ElboOutputs&, const float*, float*);
template void nll_pass<double>(const ElboArgs&, const ElboOutputs&, const double*, double*);

FASTVAE_NAMESPACE_END
