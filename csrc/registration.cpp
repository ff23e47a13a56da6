// The native ops' schemas, and the Python module `fastvae._C` whose import loads them.
// Kernels register themselves per device: cpu/*.cpp for CPU, cuda/*.cu for CUDA.
#include <torch/extension.h>
#include <torch/library.h>

#include "elbo_args.h"

TORCH_LIBRARY(fastvae_native, m) {
  m.def("reparameterize(Tensor mu, Tensor logvar, Tensor seed, int n_samples) -> Tensor");
  m.def("reparameterize_backward(Tensor grad_z, Tensor logvar, Tensor seed, int n_samples, "
        "bool need_mu, bool need_logvar) -> (Tensor, Tensor)");
  m.def("elbo(Tensor x, Tensor x_hat, Tensor? x_log_scale, Tensor mu, Tensor logvar, "
        "Tensor? prior_mu, Tensor? prior_logvar, Tensor beta, Tensor? capacity, "
        "Tensor? grad_scale, int likelihood, float x_log_scale_const, float free_bits, "
        "int reduction, bool[7] needs_grad) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("iwae(Tensor x, Tensor x_hat, Tensor? x_log_scale, Tensor z, Tensor mu, Tensor logvar, "
        "Tensor? prior_mu, Tensor? prior_logvar, Tensor? log_weight_offset, Tensor? grad_scale, "
        "int likelihood, float x_log_scale_const, int reduction, bool dreg, bool[9] needs_grad) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_(Tensor(a!)[] grads, Tensor upstream) -> ()");
  m.def("mixture_log_ratio(Tensor z, Tensor mu, Tensor logvar, Tensor means, Tensor logvars, "
        "Tensor logits) -> (Tensor, Tensor)");
  m.def("mixture_log_ratio_backward(Tensor grad, Tensor z, Tensor mu, Tensor logvar, "
        "Tensor means, Tensor logvars, Tensor logits, Tensor log_prior_sum, bool[6] needs_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("categorical(Tensor logits, Tensor target, Tensor? grad_scale, bool classes_last, "
        "int reduction, bool[1] needs_grad) -> (Tensor, Tensor, Tensor)");
  // Private, for the tests' noise-stream probe: a [4, count] float32 tensor whose column c holds
  // the four normals of the Philox call first_call + c (counter (call_lo, call_hi, 0, 0), key
  // the seed), as the kernels produce them. Reaches counters >= 2**32, which only streams of
  // more than 2**34 elements would otherwise touch.
  m.def("_philox_normals(Tensor seed, int first_call, int count) -> Tensor");
  // Private, for the tests of thread-count invariance: how many threads a parallel loop of the
  // CPU kernels runs on under the current torch.set_num_threads (cpu/threads.cpp).
  m.def("_parallel_threads() -> int");
}

namespace {
// Whether this build registered CUDA kernels; defined by the build (see CMakeLists.txt).
#ifdef FASTVAE_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

// An op called with its own arguments, returning only its first output. A typed call through
// the dispatcher runs exactly what torch.ops.fastvae_native.<op> runs, autograd kernel included,
// but Python parses no schema and wraps one tensor instead of the op's every output: for the
// elbo op's eager call on tiny tensors about 30% of the call's host cost (issue 9).
template <const char* Name, class Signature>
struct FirstOutput;

template <const char* Name, class Return, class... Args>
struct FirstOutput<Name, Return(Args...)> {
  static at::Tensor call(Args... args) {
    static const auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").typed<Return(Args...)>();
    return std::get<0>(op.call(args...));
  }
};

constexpr char kElbo[] = "fastvae_native::elbo";
}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "fastvae's native kernels (ops under torch.ops.fastvae_native)";
  module.attr("WITH_CUDA") = kWithCuda;
  // (the GIL is released while the op runs, as torch's own bindings do)
  module.def("elbo_loss", &FirstOutput<kElbo, fastvae::ElboSignature>::call,
             pybind11::call_guard<pybind11::gil_scoped_release>(),
             "fastvae_native::elbo(*args)[0]: the loss alone");
}
