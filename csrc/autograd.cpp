// The native ops' autograd, in C++ (the Autograd kernels of the fastvae_native ops). An eager
// call records its graph node here and backward runs without entering Python: at small sizes
// the Python glue of fastvae/_ops.py costs more per call than the kernels (issue 9). The rules
// are those of _ops.py's _loss_grad, _reparameterize_grad and _mixture_grad, which serve the
// reference and Triton backends and torch.compile; the shared suite checks both.
//
// Each kernel redispatches below autograd to the device kernel and, when an input requires
// grad, records a node on the differentiable output. Device-independent: built once.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "elbo_args.h"
#include "iwae_args.h"

namespace fastvae {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using torch::jit::Stack;

// torch 2.13 holds graph nodes by c10::intrusive_ptr, earlier releases by std::shared_ptr.
using NodePointer = decltype(torch::autograd::Edge::function);

template <class T>
auto make_node() {
  if constexpr (std::is_same_v<NodePointer, std::shared_ptr<Node>>) {
    return std::shared_ptr<T>(new T());
  } else {
    return c10::make_intrusive<T>();
  }
}

// Forward-mode AD is not implemented: a dual input gets a clear error, not a result without its
// tangent.
void refuse_dual_inputs(const variable_list& tensors, const char* op) {
  for (const at::Tensor& tensor : tensors) {
    TORCH_CHECK(!torch::autograd::isFwGradDefined(tensor), op,
                ": forward-mode AD (torch.autograd.forward_ad) is not implemented for fastvae's "
                "ops");
  }
}

bool any_requires_grad(const variable_list& tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor& tensor : tensors) {
    if (tensor.defined() && tensor.requires_grad()) return true;
  }
  return false;
}

at::Tensor tensor_or_undefined(const c10::IValue& value) {
  return value.isTensor() ? value.toTensor() : at::Tensor();
}

c10::IValue tensor_or_none(const at::Tensor& tensor) {
  return tensor.defined() ? c10::IValue(tensor) : c10::IValue();
}

c10::OperatorHandle native_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// ---------------------------------------------------------------------------------------------
// the loss ops: elbo, iwae, categorical
// ---------------------------------------------------------------------------------------------

// Where a loss op keeps what its autograd needs, read from its schema (the layout that
// fastvae._ops._LossOp describes): arguments [0, slots) are the differentiable tensors, input i
// having gradient output first_grad + i; then the other tensors, grad_scale, the options and
// needs_grad (bool[slots]).
struct LossLayout {
  size_t arguments, slots, first_grad, grad_scale, reduction, needs_grad;
  size_t rows;                 // an argument whose dim 0 is the batch
  std::vector<int64_t> row_dims;  // per slot, the datapoint dim of its gradient (see below)
  std::optional<size_t> beta;  // a differentiable KL weight (the ELBO's β), after the slots
  // The output β's gradient is formed from: the ELBO's [B] KL terms (fastvae._ops.ElboOutputs).
  static constexpr size_t kKlTermOutput = 3;
};

size_t argument_index(const c10::FunctionSchema& schema, const char* name) {
  const std::optional<int> index = schema.argumentIndexWithName(name);
  TORCH_INTERNAL_ASSERT(index.has_value(), schema.name(), " has no argument ", name);
  return static_cast<size_t>(*index);
}

LossLayout loss_layout(const c10::FunctionSchema& schema, const char* rows_argument,
                       std::vector<int64_t> row_dims) {
  LossLayout layout{};
  layout.arguments = schema.arguments().size();
  layout.needs_grad = argument_index(schema, "needs_grad");
  layout.slots = static_cast<size_t>(*schema.arguments()[layout.needs_grad].N());
  TORCH_INTERNAL_ASSERT(row_dims.size() == layout.slots, schema.name(), ": one row dim per slot");
  layout.row_dims = std::move(row_dims);
  layout.first_grad = schema.returns().size() - layout.slots;
  layout.grad_scale = argument_index(schema, "grad_scale");
  layout.reduction = argument_index(schema, "reduction");
  layout.rows = argument_index(schema, rows_argument);
  if (schema.argumentIndexWithName("beta")) layout.beta = argument_index(schema, "beta");
  return layout;
}

// `grad` as scale_ takes it: as it is for a 0-dim upstream, else [L, B, T] around its datapoint
// dim `row_dim`.
at::Tensor row_view(const at::Tensor& grad, const at::Tensor& upstream, int64_t row_dim) {
  if (upstream.dim() == 0) return grad;
  const int64_t row = c10::maybe_wrap_dim(row_dim, grad.dim());
  const c10::SymIntArrayRef sizes = grad.sym_sizes();
  c10::SymInt lead = 1, trail = 1;
  for (int64_t d = 0; d < row; ++d) lead = lead * sizes[d];
  for (int64_t d = row + 1; d < grad.dim(); ++d) trail = trail * sizes[d];
  return grad.view_symint({lead, sizes[row], trail});
}

// A new tensor grad · factor, per row (along `row_dim`) for a [B] factor, formed in float32
// (float64 for a float64 grad) and rounded once to grad's dtype.
at::Tensor scaled_copy(const at::Tensor& grad, at::Tensor factor, int64_t row_dim) {
  factor = factor.to(grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  if (factor.dim() != 0) {
    std::vector<int64_t> shape(grad.dim(), 1);
    shape[c10::maybe_wrap_dim(row_dim, grad.dim())] = -1;
    factor = factor.view(shape);
  }
  return (grad * factor).to(grad.scalar_type());
}

// The loss's backward: the gradients formed in forward times the upstream gradient u, in place
// on the first backward (scale_ skips the pass on the device where u is 1), as new tensors
// scaled by u / u_first on a later one through a retained graph (a gradient handed out never
// changes); or, where forward could not form them (reduction 'none' with an input shared by
// every row), the op again with u as the row weights.
struct LossBackward : Node {
  std::optional<c10::OperatorHandle> op;
  const LossLayout* layout = nullptr;
  Reduction reduction = Reduction::kMean;
  bool deferred = false;
  SavedVariable kl_term;              // the ELBO's [B] KL terms, for β's gradient
  std::vector<SavedVariable> saved;   // per slot its gradient; deferred: arguments [0, grad_scale)
  std::vector<c10::IValue> options;   // deferred: the arguments after grad_scale
  at::Tensor first_upstream;          // u of the first backward, once there was one
  uint32_t first_version = 0;         // its version then

  void save_arguments(c10::ArrayRef<c10::IValue> arguments);
  void save_outputs(c10::ArrayRef<c10::IValue> outputs);
  variable_list apply(variable_list&& grads) override;
  void release_variables() override;
  std::string name() const override { return op->schema().name() + "Backward"; }

 private:
  variable_list scaled(const at::Tensor& upstream);
  variable_list rescaled(variable_list grads, const at::Tensor& upstream) const;
  variable_list scaled_copies(variable_list grads, const at::Tensor& factor) const;
  variable_list recomputed(const at::Tensor& upstream);
};

void LossBackward::save_arguments(c10::ArrayRef<c10::IValue> arguments) {
  const c10::List<bool> needs_grad = arguments[layout->needs_grad].toBoolList();
  reduction = static_cast<Reduction>(arguments[layout->reduction].toInt());
  for (size_t slot = 0; slot < layout->slots; ++slot) {
    deferred = deferred || (should_compute_output(slot) && !needs_grad[slot]);
  }
  if (!deferred) return;
  for (size_t i = 0; i < layout->grad_scale; ++i) {
    saved.emplace_back(tensor_or_undefined(arguments[i]), /*is_output=*/false);
  }
  options.assign(arguments.begin() + layout->grad_scale + 1, arguments.end());
}

void LossBackward::save_outputs(c10::ArrayRef<c10::IValue> outputs) {
  if (layout->beta && should_compute_output(layout->slots)) {
    kl_term = SavedVariable(outputs[LossLayout::kKlTermOutput].toTensor(), /*is_output=*/false);
  }
  if (deferred) return;
  for (size_t slot = 0; slot < layout->slots; ++slot) {
    saved.emplace_back(should_compute_output(slot) ? outputs[layout->first_grad + slot].toTensor()
                                                   : at::Tensor(),
                       /*is_output=*/false);
  }
}

variable_list LossBackward::apply(variable_list&& grads) {
  variable_list out(num_outputs());
  if (!grads[0].defined()) return out;  // the loss was not used: no gradient
  const at::Tensor upstream = grads[0].contiguous();
  variable_list slot_grads = deferred ? recomputed(upstream) : scaled(upstream);
  std::move(slot_grads.begin(), slot_grads.end(), out.begin());
  if (layout->beta && should_compute_output(layout->slots)) {
    at::Tensor per_row = kl_term.unpack();
    // (an empty batch's dβ is 0, the sum over its no rows, not their mean's NaN)
    if (reduction == Reduction::kMean && per_row.sym_numel() != 0) per_row = per_row.mean();
    out[layout->slots] = (upstream * per_row).sum();
  }
  return out;
}

// Whether `tensor` is a Python tensor subclass or a functional wrapper: above all the fake and
// functional tensors of torch.compile's or opcheck's tracing of the op itself. Such a backward
// multiplies out of place, as _ops.py's traced path does: an in-place write into a traced
// graph's intermediate is not for the kernel to make.
bool traced(const at::Tensor& tensor) {
  return tensor.key_set().has_any(
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

variable_list LossBackward::scaled(const at::Tensor& upstream) {
  variable_list grads;
  for (const SavedVariable& grad : saved) grads.push_back(grad.unpack());
  if (traced(upstream)) return scaled_copies(std::move(grads), upstream);
  if (first_upstream.defined()) return rescaled(std::move(grads), upstream);
  // The gradients are the loss's own buffers, not yet handed out: scale them in place. Their
  // variable_data has its own version counter, so retaining the graph trips no check.
  std::vector<at::Tensor> buffers;
  for (size_t slot = 0; slot < grads.size(); ++slot) {
    const at::Tensor& grad = grads[slot];
    // (sym_numel: under torch.compile's tracing the sizes may be symbolic)
    if (grad.defined() && grad.sym_numel() != 0) {
      buffers.push_back(row_view(grad.variable_data(), upstream, layout->row_dims[slot]));
    }
  }
  static const auto scale_op =
      native_op("fastvae_native::scale_").typed<void(at::TensorList, const at::Tensor&)>();
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    scale_op.call(buffers, upstream);
  }
  // Kept by reference (a copy would cost a kernel per step); its version tells a later
  // backward whether the caller changed it in place since.
  first_upstream = upstream;
  first_version = upstream._version();
  return grads;
}

variable_list LossBackward::rescaled(variable_list grads, const at::Tensor& upstream) const {
  TORCH_CHECK(first_upstream._version() == first_version,
              "fastvae: the gradient passed to the first backward through this retained graph "
              "was modified in place since; pass a new tensor to backward instead of changing "
              "that one");
  // This read syncs, but only on a later backward through a retained graph.
  TORCH_CHECK(!(first_upstream == 0).any().item<bool>(),
              "fastvae: backward through a retained graph whose first backward had an upstream "
              "gradient of 0, which scaled the loss's gradients to 0 in place; run the first "
              "backward with a nonzero gradient");
  return scaled_copies(std::move(grads), upstream / first_upstream);
}

variable_list LossBackward::scaled_copies(variable_list grads, const at::Tensor& factor) const {
  for (size_t slot = 0; slot < grads.size(); ++slot) {
    at::Tensor& grad = grads[slot];
    if (grad.defined()) grad = scaled_copy(grad, factor, layout->row_dims[slot]);
  }
  return grads;
}

variable_list LossBackward::recomputed(const at::Tensor& upstream) {
  Stack stack;
  for (const SavedVariable& argument : saved) stack.push_back(tensor_or_none(argument.unpack()));
  const int64_t batch = stack[layout->rows].toTensor().sym_size(0).guard_int(__FILE__, __LINE__);
  at::Tensor rows = upstream.expand({batch}).contiguous();
  if (reduction == Reduction::kMean) rows = rows / std::max<int64_t>(batch, 1);
  stack.emplace_back(rows);
  stack.insert(stack.end(), options.begin(), options.end());
  c10::List<bool> needs;
  for (size_t slot = 0; slot < layout->slots; ++slot) needs.push_back(should_compute_output(slot));
  stack[layout->reduction] = static_cast<int64_t>(Reduction::kNone);
  stack[layout->needs_grad] = needs;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    op->callBoxed(stack);
  }
  variable_list grads;
  for (size_t slot = 0; slot < layout->slots; ++slot) {
    grads.push_back(needs[slot] ? stack[layout->first_grad + slot].toTensor() : at::Tensor());
  }
  return grads;
}

void LossBackward::release_variables() {
  kl_term.reset_data();
  for (SavedVariable& variable : saved) variable.reset_data();
  options.clear();
  first_upstream.reset();
}

// The Autograd kernel of a loss op: the device kernel below autograd, and a LossBackward on the
// loss (output 0) where a differentiable input requires grad; the other outputs carry none.
class LossAutograd final : public c10::OperatorKernel {
 public:
  LossAutograd(const char* rows_argument, std::vector<int64_t> row_dims)
      : rows_argument_(rows_argument), row_dims_(std::move(row_dims)) {}

  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet keys, Stack* stack) {
    const LossLayout& layout = layout_of(op);
    const c10::ArrayRef<c10::IValue> arguments = torch::jit::last(*stack, layout.arguments);
    variable_list differentiable;
    for (size_t i = 0; i < layout.slots; ++i) {
      differentiable.push_back(tensor_or_undefined(arguments[i]));
    }
    if (layout.beta) differentiable.push_back(arguments[*layout.beta].toTensor());
    refuse_dual_inputs(differentiable, op.schema().name().c_str());
    auto node = any_requires_grad(differentiable) ? make_node<LossBackward>() : nullptr;
    if (node) {
      node->op = op;
      node->layout = &layout;
      node->set_next_edges(torch::autograd::collect_next_edges(differentiable));
      node->save_arguments(arguments);  // before the stack is replaced by the outputs
    }
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
    }
    if (!node) return;
    const auto outputs = torch::jit::last(*stack, op.schema().returns().size());
    torch::autograd::set_history(outputs[0].toTensor(), node);
    node->save_outputs(outputs);
  }

 private:
  const LossLayout& layout_of(const c10::OperatorHandle& op) {
    std::call_once(once_, [&] { layout_ = loss_layout(op.schema(), rows_argument_, row_dims_); });
    return *layout_;
  }

  const char* rows_argument_;
  std::vector<int64_t> row_dims_;
  std::once_flag once_;
  std::optional<LossLayout> layout_;
};

// ---------------------------------------------------------------------------------------------
// reparameterised sampling: backward regenerates ε from the seed
// ---------------------------------------------------------------------------------------------
struct ReparameterizeBackward : Node {
  SavedVariable logvar, seed;
  int64_t samples = 1;

  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    static const auto backward_op =
        native_op("fastvae_native::reparameterize_backward")
            .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, int64_t, bool, bool)>();
    const bool need_mu = should_compute_output(0), need_logvar = should_compute_output(1);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_mu, grad_logvar] = backward_op.call(grads[0].contiguous(), logvar.unpack(),
                                                   seed.unpack(), samples, need_mu, need_logvar);
    if (need_mu) out[0] = std::move(grad_mu);
    if (need_logvar) out[1] = std::move(grad_logvar);
    return out;
  }
  void release_variables() override {
    logvar.reset_data();
    seed.reset_data();
  }
  std::string name() const override { return "fastvae_native::reparameterizeBackward"; }
};

at::Tensor reparameterize_autograd(const at::Tensor& mu, const at::Tensor& logvar,
                                   const at::Tensor& seed, int64_t n_samples) {
  refuse_dual_inputs({mu, logvar}, "fastvae_native::reparameterize");
  static const auto forward_op =
      native_op("fastvae_native::reparameterize")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
  at::Tensor z;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    z = forward_op.call(mu, logvar, seed, n_samples);
  }
  if (!any_requires_grad({mu, logvar})) return z;
  auto node = make_node<ReparameterizeBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(mu, logvar));
  node->logvar = SavedVariable(logvar, /*is_output=*/false);
  node->seed = SavedVariable(seed, /*is_output=*/false);
  node->samples = n_samples;
  torch::autograd::set_history(z, node);
  return z;
}

// ---------------------------------------------------------------------------------------------
// the mixture prior's log ratio: backward recomputes the responsibilities from the latents
// ---------------------------------------------------------------------------------------------
constexpr size_t kMixtureInputs = 6;  // z, mu, logvar, means, logvars, logits

struct MixtureBackward : Node {
  std::vector<SavedVariable> inputs;  // the six inputs, then log_prior_sum

  variable_list apply(variable_list&& grads) override {
    variable_list out(kMixtureInputs);
    if (!grads[0].defined()) return out;
    static const auto backward_op =
        native_op("fastvae_native::mixture_log_ratio_backward")
            .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                              at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const at::Tensor&,
                                          std::array<bool, kMixtureInputs>)>();
    std::array<bool, kMixtureInputs> needs{};
    for (size_t i = 0; i < kMixtureInputs; ++i) needs[i] = should_compute_output(i);
    variable_list saved;
    for (const SavedVariable& input : inputs) saved.push_back(input.unpack());
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto all = backward_op.call(grads[0].contiguous(), saved[0], saved[1], saved[2],
                                      saved[3], saved[4], saved[5], saved[6], needs);
    const variable_list computed = {std::get<0>(all), std::get<1>(all), std::get<2>(all),
                                    std::get<3>(all), std::get<4>(all), std::get<5>(all)};
    for (size_t i = 0; i < kMixtureInputs; ++i) {
      if (needs[i]) out[i] = computed[i];
    }
    return out;
  }
  void release_variables() override {
    for (SavedVariable& input : inputs) input.reset_data();
  }
  std::string name() const override { return "fastvae_native::mixture_log_ratioBackward"; }
};

std::tuple<at::Tensor, at::Tensor> mixture_autograd(const at::Tensor& z, const at::Tensor& mu,
                                                    const at::Tensor& logvar,
                                                    const at::Tensor& means,
                                                    const at::Tensor& logvars,
                                                    const at::Tensor& logits) {
  const variable_list inputs = {z, mu, logvar, means, logvars, logits};
  refuse_dual_inputs(inputs, "fastvae_native::mixture_log_ratio");
  static const auto forward_op =
      native_op("fastvae_native::mixture_log_ratio")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&)>();
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = forward_op.call(z, mu, logvar, means, logvars, logits);
  }
  if (!any_requires_grad(inputs)) return out;
  auto node = make_node<MixtureBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(inputs));
  for (const at::Tensor& input : inputs) node->inputs.emplace_back(input, /*is_output=*/false);
  node->inputs.emplace_back(std::get<1>(out), /*is_output=*/false);
  torch::autograd::set_history(std::get<0>(out), node);
  return out;
}

}  // namespace
}  // namespace fastvae

TORCH_LIBRARY_IMPL(fastvae_native, Autograd, m) {
  using fastvae::LossAutograd;
  // Each slot's datapoint dim, negative from the end (fastvae._common's ROW_DIMS,
  // IWAE_ROW_DIMS and CATEGORICAL_ROW_DIMS): the second-last of every ELBO and bound input but
  // the bound's log-weight offset [S, B], which has it last; dim 1 of the logits [S, B, ...].
  std::vector<int64_t> iwae_rows(fastvae::IwaeSlot::kCount, -2);
  iwae_rows[fastvae::IwaeSlot::kLogWeightOffset] = -1;
  m.impl("elbo", torch::CppFunction::makeFromBoxedFunctor(std::make_unique<LossAutograd>(
                     "x", std::vector<int64_t>(fastvae::kInputCount, -2))));
  m.impl("iwae", torch::CppFunction::makeFromBoxedFunctor(
                     std::make_unique<LossAutograd>("x", std::move(iwae_rows))));
  // The logits are [S, B, ...]: the batch is the target's dim 0.
  m.impl("categorical", torch::CppFunction::makeFromBoxedFunctor(
                            std::make_unique<LossAutograd>("target", std::vector<int64_t>{1})));
  m.impl("reparameterize", TORCH_FN(fastvae::reparameterize_autograd));
  m.impl("mixture_log_ratio", TORCH_FN(fastvae::mixture_autograd));
}
