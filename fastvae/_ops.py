"""The fused ops and their autograd, on two call paths that share one backward.

* Eager calls take the fast path: the resolved backend module's function itself when it
  records its own autograd (the native ops, whose autograd is C++: ``csrc/autograd.cpp``
  follows the rules written here) or when no gradient is wanted; else a
  ``torch.autograd.Function`` calling it. Python between the user and the kernel is one cached
  backend lookup (and the Function's own dispatch).
* Under ``torch.compile`` the same computation is a ``torch.library`` custom op
  (``fastvae::elbo``, ``iwae``, ``categorical``, ``reparameterize``, ``mixture_log_ratio``),
  with fake implementations and ``register_autograd``, so the compiler sees one opaque node
  with known shapes; ``opcheck`` tests these ops.

The loss ops (elbo, iwae, categorical) share one autograd glue, described by ``_LossOp``. Each
forms its gradients in the forward pass. Its backward multiplies them by the upstream
gradient: on the eager path in place, by the backend's ``scale_``, whose kernels test on the
device whether the upstream gradient is 1 and then touch nothing (a plain ``loss.backward()``
costs no pass over the gradients and no host sync); under tracing as an ordinary multiply.
Only the first backward through a graph scales in place; a later one (``retain_graph=True``)
returns new tensors, so a gradient already handed to autograd never changes.
The sampling op saves only ``logvar`` (an input) and the seed, and regenerates ε in backward;
the mixture prior's op recomputes its responsibilities in backward from the latent tensors.
"""
import functools
import inspect
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.utils._device import DeviceContext

from . import _shapes, backends
from ._common import CATEGORICAL_ROW_DIMS, IWAE_ROW_DIMS, ROW_DIMS, Reduction


def _wraps(backend, tensors) -> bool:
    """Whether an eager call of ``backend`` goes through its ``autograd.Function``: for a
    backend without autograd of its own, when a gradient is wanted, or when forward-mode AD is
    active (the Functions have no jvp, so they raise rather than drop the tangent; the native
    ops' C++ autograd refuses dual inputs likewise)."""
    if backend.RECORDS_AUTOGRAD:
        return False
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                           for t in tensors)


# ----------------------------------------------------------------------------------------------
# reparameterised sampling
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvae::reparameterize", mutates_args=())
def reparameterize_op(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int,
                      backend: str) -> Tensor:
    return backends.module(backend).reparameterize_forward(mu, logvar, seed, n_samples)


@torch.library.custom_op("fastvae::reparameterize_backward", mutates_args=())
def reparameterize_backward_op(grad_z: Tensor, logvar: Tensor, seed: Tensor, n_samples: int,
                               need_mu: bool, need_logvar: bool,
                               backend: str) -> Tuple[Tensor, Tensor]:
    return backends.module(backend).reparameterize_backward(
        grad_z, logvar, seed, n_samples, need_mu, need_logvar)


reparameterize_op.register_fake(_shapes.reparameterize)
reparameterize_backward_op.register_fake(_shapes.reparameterize_backward)


def _reparameterize_setup(ctx, inputs, output):
    mu, logvar, seed, n_samples, backend = inputs
    ctx.save_for_backward(logvar, seed)
    ctx.n_samples, ctx.backend = n_samples, backend


def _reparameterize_grad(ctx, grad_z):
    logvar, seed = ctx.saved_tensors
    need_mu, need_logvar = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    args = (grad_z.contiguous(), logvar, seed, ctx.n_samples, need_mu, need_logvar)
    if isinstance(ctx.backend, str):
        grad_mu, grad_logvar = reparameterize_backward_op(*args, ctx.backend)
    else:
        grad_mu, grad_logvar = ctx.backend.reparameterize_backward(*args)
    return (grad_mu if need_mu else None, grad_logvar if need_logvar else None, None, None, None)


reparameterize_op.register_autograd(_reparameterize_grad, setup_context=_reparameterize_setup)


class _EagerReparameterize(torch.autograd.Function):
    """The eager path: the last input is the backend module instead of its name. (forward
    takes ctx itself: with a separate setup_context, ``apply`` binds the arguments through
    ``inspect.signature`` on every call, which costs more than the rest of the call.)"""

    @staticmethod
    def forward(ctx, mu, logvar, seed, n_samples, backend):
        z = backend.reparameterize_forward(mu, logvar, seed, n_samples)
        _reparameterize_setup(ctx, (mu, logvar, seed, n_samples, backend), z)
        return z

    backward = staticmethod(_reparameterize_grad)


def reparameterize(mu: Tensor, logvar: Tensor, seed: Tensor, n_samples: int) -> Tensor:
    """``z`` of ``[n_samples * K]`` for 1-D ``mu``, ``logvar`` on the selected backend."""
    if torch.compiler.is_compiling():
        name = backends.resolve_name(backends.get_backend(), mu.device.type)
        return reparameterize_op(mu, logvar, seed, n_samples, name)
    backend = backends.implementation(mu.device)[1]
    if _wraps(backend, (mu, logvar)):
        return _EagerReparameterize.apply(mu, logvar, seed, n_samples, backend)
    return backend.reparameterize_forward(mu, logvar, seed, n_samples)


# ----------------------------------------------------------------------------------------------
# the mixture prior's log ratio
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastvae::mixture_log_ratio", mutates_args=())
def mixture_log_ratio_op(z: Tensor, mu: Tensor, logvar: Tensor, means: Tensor, logvars: Tensor,
                         logits: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return backends.module(backend).mixture_log_ratio(z, mu, logvar, means, logvars, logits)


@torch.library.custom_op("fastvae::mixture_log_ratio_backward", mutates_args=())
def mixture_log_ratio_backward_op(grad: Tensor, z: Tensor, mu: Tensor, logvar: Tensor,
                                  means: Tensor, logvars: Tensor, logits: Tensor,
                                  log_prior_sum: Tensor, needs_grad: List[bool], backend: str
                                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(backends.module(backend).mixture_log_ratio_backward(
        grad, z, mu, logvar, means, logvars, logits, log_prior_sum, needs_grad))


mixture_log_ratio_op.register_fake(_shapes.mixture_log_ratio)
mixture_log_ratio_backward_op.register_fake(_shapes.mixture_log_ratio_backward)


def _mixture_setup(ctx, inputs, output):
    # The latent tensors are small (B×d, K×d): backward recomputes the responsibilities from
    # them and the per-sample log-sum-exp instead of keeping a [S, B, K] tensor.
    ctx.save_for_backward(*inputs[:6], output[1])
    ctx.backend = inputs[6]
    ctx.mark_non_differentiable(output[1])


def _mixture_grad(ctx, grad_ratio, unused):
    if grad_ratio is None:
        return (None,) * 7
    *inputs, log_prior_sum = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    args = (grad_ratio.contiguous(), *inputs, log_prior_sum, needs)
    if isinstance(ctx.backend, str):
        grads = mixture_log_ratio_backward_op(*args, ctx.backend)
    else:
        grads = ctx.backend.mixture_log_ratio_backward(*args)
    return (*(g if need else None for g, need in zip(grads, needs)), None)


mixture_log_ratio_op.register_autograd(_mixture_grad, setup_context=_mixture_setup)


class _EagerMixture(torch.autograd.Function):
    """The eager path (see _EagerReparameterize)."""

    @staticmethod
    def forward(ctx, z, mu, logvar, means, logvars, logits, backend):
        output = backend.mixture_log_ratio(z, mu, logvar, means, logvars, logits)
        _mixture_setup(ctx, (z, mu, logvar, means, logvars, logits, backend), output)
        return output

    backward = staticmethod(_mixture_grad)


def mixture_log_ratio(*args: Tensor) -> Tuple[Tensor, Tensor]:
    """``(log q(z|x) − log p(z), log_prior_sum)`` per sample for the normalised latent
    tensors ``args`` = (z, mu, logvar, means, logvars, logits), on the selected backend."""
    device = args[0].device
    if torch.compiler.is_compiling():
        return mixture_log_ratio_op(*args, backends.resolve_name(backends.get_backend(),
                                                                 device.type))
    backend = backends.implementation(device)[1]
    if _wraps(backend, args):
        return _EagerMixture.apply(*args, backend)
    return backend.mixture_log_ratio(*args)


# ----------------------------------------------------------------------------------------------
# the fused losses: their outputs and ops
# ----------------------------------------------------------------------------------------------
class ElboOutputs(NamedTuple):
    """The ELBO op's outputs: the reduced loss, three per-datapoint ``[B]`` rows (the NLL,
    the analytic KL and the KL term after free bits) and the 7 gradient slots, named as
    ``fastvae._common.INPUTS`` (empty where not requested)."""
    loss: Tensor
    nll: Tensor
    kl: Tensor
    kl_term: Tensor
    grad_x: Tensor
    grad_x_hat: Tensor
    grad_x_log_scale: Tensor
    grad_mu: Tensor
    grad_logvar: Tensor
    grad_prior_mu: Tensor
    grad_prior_logvar: Tensor


class IwaeOutputs(NamedTuple):
    """The importance-weighted bound op's outputs: the reduced negative bound, the ``[S, B]``
    log weights and the 9 gradient slots, named as ``fastvae._common.IWAE_INPUTS``."""
    loss: Tensor
    log_weights: Tensor
    grad_x: Tensor
    grad_x_hat: Tensor
    grad_x_log_scale: Tensor
    grad_z: Tensor
    grad_mu: Tensor
    grad_logvar: Tensor
    grad_prior_mu: Tensor
    grad_prior_logvar: Tensor
    grad_log_weight_offset: Tensor


class CategoricalOutputs(NamedTuple):
    """The categorical likelihood op's outputs: the reduced NLL, the ``[B]`` NLL rows and the
    gradient of the logits (empty where not requested)."""
    loss: Tensor
    nll: Tensor
    grad_logits: Tensor


def _elbo(x: Tensor, x_hat: Tensor, x_log_scale: Optional[Tensor], mu: Tensor, logvar: Tensor,
          prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor], beta: Tensor,
          capacity: Optional[Tensor], grad_scale: Optional[Tensor], likelihood: int,
          x_log_scale_const: float, free_bits: float, reduction: int, needs_grad: List[bool],
          backend: str
          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                     Tensor, Tensor]:
    return tuple(backends.module(backend).elbo(
        x, x_hat, x_log_scale, mu, logvar, prior_mu, prior_logvar, beta, capacity, grad_scale,
        likelihood, x_log_scale_const, free_bits, reduction, needs_grad))


def _iwae(x: Tensor, x_hat: Tensor, x_log_scale: Optional[Tensor], z: Tensor, mu: Tensor,
          logvar: Tensor, prior_mu: Optional[Tensor], prior_logvar: Optional[Tensor],
          log_weight_offset: Optional[Tensor], grad_scale: Optional[Tensor], likelihood: int,
          x_log_scale_const: float, reduction: int, dreg: bool, needs_grad: List[bool],
          backend: str
          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                     Tensor, Tensor]:
    return tuple(backends.module(backend).iwae(
        x, x_hat, x_log_scale, z, mu, logvar, prior_mu, prior_logvar, log_weight_offset,
        grad_scale, likelihood, x_log_scale_const, reduction, dreg, needs_grad))


def _categorical(logits: Tensor, target: Tensor, grad_scale: Optional[Tensor],
                 classes_last: bool, reduction: int, needs_grad: List[bool], backend: str
                 ) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(backends.module(backend).categorical(
        logits, target, grad_scale, classes_last, reduction, needs_grad))


elbo_op = torch.library.custom_op("fastvae::elbo", mutates_args=())(_elbo)
iwae_op = torch.library.custom_op("fastvae::iwae", mutates_args=())(_iwae)
categorical_op = torch.library.custom_op("fastvae::categorical", mutates_args=())(_categorical)
elbo_op.register_fake(_shapes.elbo)
iwae_op.register_fake(_shapes.iwae)
categorical_op.register_fake(_shapes.categorical)


class _LossOp(NamedTuple):
    """What the shared autograd glue needs to know of a loss op. Every loss op takes its
    differentiable tensors first (input i = gradient slot i), then the other tensors, then
    ``grad_scale`` and options, and last the backend; it returns the loss, then other
    non-differentiable outputs, then one gradient per slot."""
    function: str        # the backend function: 'elbo', 'iwae' or 'categorical'
    custom_op: object    # the torch.library op, for tracing
    outputs: type        # the NamedTuple of the outputs
    arity: int           # op arguments, the backend included
    first_grad: int      # output index of gradient slot 0
    rows: int            # argument index of a tensor whose dim 0 is the batch
    grad_scale: int      # argument indices
    reduction: int
    needs_grad: int
    beta: Optional[int]  # argument index of a differentiable KL weight (the ELBO's β)
    row_dims: tuple      # per slot, the datapoint dim of its gradient (fastvae._common)

    @property
    def slots(self) -> int:
        """The differentiable tensors: one row dim each."""
        return len(self.row_dims)


def _loss_op(function, custom_op, implementation, outputs, row_dims, rows=0) -> _LossOp:
    names = list(inspect.signature(implementation).parameters)
    first_grad = next(i for i, name in enumerate(outputs._fields) if name.startswith("grad_"))
    return _LossOp(function, custom_op, outputs, len(names), first_grad, rows,
                   names.index("grad_scale"), names.index("reduction"),
                   names.index("needs_grad"), names.index("beta") if "beta" in names else None,
                   row_dims)


_ELBO = _loss_op("elbo", elbo_op, _elbo, ElboOutputs, ROW_DIMS)
_IWAE = _loss_op("iwae", iwae_op, _iwae, IwaeOutputs, IWAE_ROW_DIMS)
# The logits are [S, B, ...]: the batch is the target's dim 0.
_CATEGORICAL = _loss_op("categorical", categorical_op, _categorical, CategoricalOutputs,
                        CATEGORICAL_ROW_DIMS, rows=1)


# ----------------------------------------------------------------------------------------------
# the fused losses: autograd, shared
# ----------------------------------------------------------------------------------------------
def _loss_setup(spec: _LossOp, ctx, inputs, output):
    needs_grad = inputs[spec.needs_grad]
    # Only the loss carries gradient; without this autograd would fill zeros shaped like every
    # other output (the B×D gradient outputs among them) on each backward.
    ctx.set_materialize_grads(False)
    ctx.spec, ctx.reduction, ctx.backend = spec, inputs[spec.reduction], inputs[-1]
    ctx.eager = not isinstance(ctx.backend, str)
    ctx.first_upstream = None  # the upstream gradient of the first backward, once there was one
    # A gradient that could not be formed in forward (reduction 'none' with an input shared by
    # every datapoint) is recomputed in backward with the upstream gradient as row weights.
    ctx.deferred = any(ctx.needs_input_grad[i] and not needs_grad[i] for i in range(spec.slots))
    # The ELBO's β gets its gradient from the KL term of each row (|KL − C| with a capacity,
    # which itself gets none: the API refuses a capacity that requires grad).
    kl_term = output[3] if spec.beta is not None else None
    if ctx.deferred:
        ctx.save_for_backward(kl_term, *inputs[:spec.grad_scale])
        ctx.options = inputs[spec.grad_scale + 1:-1]
    else:
        ctx.save_for_backward(kl_term, *output[spec.first_grad:])


def _loss_grad(ctx, grad_loss, *unused_grads):
    spec = ctx.spec
    if grad_loss is None:  # the loss itself was not used; the other outputs carry no gradient
        return (None,) * spec.arity
    kl_term, *saved = ctx.saved_tensors
    if ctx.deferred:
        grads = _recomputed_grads(ctx, saved, grad_loss)
    else:
        grads = _scaled_grads(ctx, saved, grad_loss)
    rest = [None] * (spec.arity - spec.slots)
    if spec.beta is not None and ctx.needs_input_grad[spec.beta]:
        per_row = kl_term
        if ctx.reduction == Reduction.MEAN and kl_term.numel():  # (an empty batch's dβ is 0)
            per_row = kl_term.mean()
        rest[spec.beta - spec.slots] = (grad_loss * per_row).sum()
    return (*grads, *rest)


def _recomputed_grads(ctx, inputs, grad_loss):
    spec = ctx.spec
    batch = inputs[spec.rows].shape[0]
    rows = grad_loss.expand(batch).contiguous()
    if ctx.reduction == Reduction.MEAN:
        rows = rows / max(batch, 1)
    needs = [bool(n) for n in ctx.needs_input_grad[:spec.slots]]
    args = [*inputs, rows, *ctx.options]
    args[spec.reduction], args[spec.needs_grad] = int(Reduction.NONE), needs
    if ctx.eager:
        out = getattr(ctx.backend, spec.function)(*args)
    else:
        out = spec.custom_op(*args, ctx.backend)
    return [g if need else None for g, need in zip(out[spec.first_grad:], needs)]


def _scaled_grads(ctx, saved, grad_loss):
    """The gradients formed in forward times the upstream gradient ``grad_loss``."""
    grads = [g if need else None for g, need in zip(saved, ctx.needs_input_grad[:ctx.spec.slots])]
    rows = ctx.spec.row_dims
    if not ctx.eager:
        return _scaled_copies(grads, rows, grad_loss, None)
    upstream = grad_loss.contiguous()
    if ctx.first_upstream is not None:  # a later backward through a retained graph
        return _scaled_copies(grads, rows, upstream, _first_upstream(ctx))
    # The gradients are the loss's own buffers, not yet handed out: scale them in place. .data
    # has its own version counter, so retaining the graph does not trip autograd's check.
    ctx.backend.scale_([_row_view(g.data, upstream, row) for g, row in zip(grads, rows)
                        if g is not None and g.numel()], upstream)
    # Kept by reference (a copy would cost a kernel per step); its version tells a later
    # backward whether the caller changed it in place since.
    ctx.first_upstream = (upstream, upstream._version)
    return grads


def _first_upstream(ctx) -> Tensor:
    """The upstream gradient the buffers were scaled by in place, checked to be usable."""
    first, version = ctx.first_upstream
    if first._version != version:
        raise RuntimeError("fastvae: the gradient passed to the first backward through this "
                           "retained graph was modified in place since; pass a new tensor to "
                           "backward instead of changing that one")
    # This read syncs, but only on a later backward through a retained graph.
    if bool((first == 0).any()):
        raise RuntimeError("fastvae: backward through a retained graph whose first backward "
                           "had an upstream gradient of 0, which scaled the loss's gradients "
                           "to 0 in place; run the first backward with a nonzero gradient")
    return first


def _row_view(grad: Tensor, upstream: Tensor, row_dim: int) -> Tensor:
    """``grad`` as ``scale_`` takes it: as it is for a 0-dim upstream, else ``[L, B, T]``
    around its datapoint dim ``row_dim``."""
    if not upstream.dim():
        return grad
    row = row_dim % grad.dim()
    shape = grad.shape
    return grad.view(math.prod(shape[:row]), shape[row], math.prod(shape[row + 1:]))


def _scaled_copies(grads, row_dims, upstream: Tensor, previous: Optional[Tensor]) -> list:
    """Each gradient (None stays None) as a new tensor scaled by :func:`_scaled`."""
    return [None if g is None else _scaled(g, upstream, previous, row)
            for g, row in zip(grads, row_dims)]


def _scaled(grad: Tensor, upstream: Tensor, previous: Optional[Tensor], row_dim: int) -> Tensor:
    """A new tensor ``grad * upstream / previous``, per row (along ``row_dim``) for a ``[B]``
    upstream."""
    factor = upstream if previous is None else upstream / previous
    factor = factor.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    if factor.dim():
        shape = [1] * grad.dim()
        shape[row_dim] = -1
        factor = factor.view(shape)
    return (grad * factor).to(grad.dtype)


for _spec in (_ELBO, _IWAE, _CATEGORICAL):
    _spec.custom_op.register_autograd(_loss_grad,
                                      setup_context=functools.partial(_loss_setup, _spec))


def _eager_function(spec: _LossOp):
    """The eager path of a loss op: a Function whose last input is the backend module instead
    of its name (forward takes ctx itself, see _EagerReparameterize)."""
    def forward(ctx, *inputs):
        output = getattr(inputs[-1], spec.function)(*inputs[:-1])
        _loss_setup(spec, ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    return type(f"_Eager_{spec.function}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(_loss_grad)})


_EAGER = {spec.function: _eager_function(spec) for spec in (_ELBO, _IWAE, _CATEGORICAL)}


def _run(spec: _LossOp, args, device: torch.device):
    """The loss op ``spec`` on the backend for ``device``; ``args`` are the op's (without
    backend)."""
    if torch.compiler.is_compiling():
        name = backends.resolve_name(backends.get_backend(), device.type)
        return spec.outputs._make(spec.custom_op(*args, name))
    backend = backends.implementation(device)[1]
    if _wraps(backend, args[:spec.grad_scale]):
        return spec.outputs._make(_EAGER[spec.function].apply(*args, backend))
    return spec.outputs._make(getattr(backend, spec.function)(*args))


def elbo(*args, device: torch.device) -> ElboOutputs:
    """The ELBO op on the backend for ``device``; ``args`` are the op's (without backend)."""
    return _run(_ELBO, args, device)


def elbo_loss(*args, device: torch.device) -> Tensor:
    """``elbo(*args, device=device).loss``: in an eager call the backend's own ``elbo_loss``
    where it has one, which makes no Python objects of the other ten outputs. (That binding
    bypasses torch function handling, so under a torch function mode, which must see the op,
    the op is called as usual.)"""
    loss_only = None
    # (tested first: a traced call must not reach the backend lookup, which imports on a miss)
    if not (torch.compiler.is_compiling() or _function_mode_active()):
        loss_only = getattr(backends.implementation(device)[1], "elbo_loss", None)
    return elbo(*args, device=device).loss if loss_only is None else loss_only(*args)


def _function_mode_active() -> bool:
    """Whether a torch function mode is active other than a default device (``with
    torch.device(...)``, which only places new tensors)."""
    if not torch.overrides._is_torch_function_mode_enabled():
        return False
    modes = torch.overrides._get_current_function_mode_stack()
    return not all(isinstance(mode, DeviceContext) for mode in modes)


def iwae(*args, device: torch.device) -> IwaeOutputs:
    """The importance-weighted bound op on the backend for ``device``; ``args`` are the op's
    (without backend)."""
    return _run(_IWAE, args, device)


def categorical(*args, device: torch.device) -> CategoricalOutputs:
    """The categorical likelihood op on the backend for ``device``; ``args`` are the op's
    (without backend)."""
    return _run(_CATEGORICAL, args, device)
