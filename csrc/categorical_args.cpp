// Validation and output allocation of the categorical likelihood op (see categorical_args.h).
#include "categorical_args.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "arg_checks.h"

namespace fastvae {
namespace {

constexpr const char* kOp = "fastvae_native::categorical: ";

bool floating(c10::ScalarType type) {
  return type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16;
}

void check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 4 && logits.is_contiguous() && floating(logits.scalar_type()), kOp,
              "logits must be a contiguous 4-D float32, float64, float16 or bfloat16 tensor, got ",
              logits.sizes(), " ", logits.scalar_type());
}

void check_target(const CategoricalArgs& a) {
  const at::Tensor& target = *a.target;
  TORCH_CHECK(target.dim() == 2 && target.is_contiguous() &&
                  (target.scalar_type() == at::kLong || target.scalar_type() == at::kByte) &&
                  target.device() == a.logits->device(),
              kOp, "target must be a contiguous 2-D int64 or uint8 tensor on ",
              a.logits->device(), ", got ", target.sizes(), " ", target.scalar_type(), " on ",
              target.device());
  TORCH_CHECK(target.size(0) == a.batch && target.size(1) == a.features, kOp, "target must be [",
              a.batch, ", ", a.features, "] for logits of ", a.logits->sizes(),
              a.classes_last ? " ([S, B, D, K])" : " ([S, B, K, D])", ", got ", target.sizes());
}

void check_options(const CategoricalArgs& a) {
  TORCH_CHECK(a.classes >= 1, kOp, "logits must have at least one class, got ",
              a.logits->sizes());
  if (a.grad_scale) {
    TORCH_CHECK(a.grad_scale->dim() == 1 && a.grad_scale->size(0) == a.batch &&
                    a.grad_scale->is_contiguous() && floating(a.grad_scale->scalar_type()) &&
                    a.grad_scale->device() == a.logits->device(),
                kOp, "grad_scale must be a contiguous floating [", a.batch, "] tensor on ",
                a.logits->device(), ", got ", a.grad_scale->sizes());
  }
  TORCH_CHECK(a.reduction >= Reduction::kNone && a.reduction <= Reduction::kSum, kOp,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              static_cast<int64_t>(a.reduction));
}

}  // namespace

double CategoricalArgs::uniform_weight() const {
  return reduction == Reduction::kMean ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1))
                                       : 1.0;
}

CategoricalArgs make_categorical_args(const at::Tensor& logits, const at::Tensor& target,
                                      const std::optional<at::Tensor>& grad_scale,
                                      bool classes_last, int64_t reduction,
                                      std::array<bool, 1> needs_grad) {
  check_logits(logits);
  const int64_t classes = logits.size(classes_last ? 3 : 2);
  const int64_t features = logits.size(classes_last ? 2 : 3);
  CategoricalArgs args{&logits, &target, grad_scale.has_value() ? &*grad_scale : nullptr,
                       classes_last, static_cast<Reduction>(reduction), needs_grad[0],
                       logits.size(0), logits.size(1), features, classes,
                       accumulation_dtype({&logits})};
  check_target(args);
  check_options(args);
  return args;
}

CategoricalOutputs allocate_categorical_outputs(const CategoricalArgs& args) {
  const auto options = args.logits->options().dtype(args.accumulation);
  return {args.reduction == Reduction::kNone ? at::empty({args.batch}, options)
                                             : at::empty({}, options),
          at::empty({args.batch}, options),
          gradient_output(args.needs_grad, *args.logits, args.logits->options())};
}

}  // namespace fastvae
