"""torch.library.opcheck over the registered ops (schema, fake implementation, autograd
registration, aot_dispatch) for the options the other tests do not cover, on every backend."""
import pytest
import torch

from cases import TEST_DEVICE
from op_args import elbo_args

# The registered ops (what torch.compile traces), whatever the Python names of their wrappers.
ELBO = torch.ops.fastvae.elbo.default
REPARAMETERIZE = torch.ops.fastvae.reparameterize.default
REPARAMETERIZE_BACKWARD = torch.ops.fastvae.reparameterize_backward.default

OPCHECK_ELBO = {
    "bernoulli_shared_prior_sum_beta_grad": dict(log_scale=None, likelihood="bernoulli",
                                                 prior="shared", reduction="sum", beta_grad=True),
    "datapoint_prior_const_scale_free_bits": dict(log_scale=None, prior="datapoint", free_bits=0.2),
    "log_scale_datapoint_bf16_decoder": dict(log_scale="1BD", hat_dtype=torch.bfloat16,
                                             x_requires_grad=False),
    "log_scale_full_none_grad_scale": dict(log_scale="SBD", reduction="none", prior="datapoint",
                                           grad_scale=True),
    "float64_log_scale_scalar_prior": dict(dtype=torch.float64, log_scale="111", prior="shared",
                                           reduction="sum"),
    "float64_data_without_grad": dict(dtype=torch.float64, x_requires_grad=False),
    "laplace_event_log_scale_free_bits": dict(likelihood="laplace", log_scale="11D",
                                              free_bits=0.3, beta_grad=True),
    "laplace_shared_log_scale_none": dict(likelihood="laplace", log_scale="S11",
                                          reduction="none", prior="shared"),
}


@pytest.mark.parametrize("name", OPCHECK_ELBO)
def test_opcheck_elbo_options(backend, name):
    args = elbo_args(requires_grad=True, needs="api", **OPCHECK_ELBO[name])
    torch.library.opcheck(ELBO, args.op_args(backend))


def test_opcheck_elbo_nothing_needed(backend):
    args = elbo_args(requires_grad=True, needs=[False] * 7, reduction="none", grad_scale=True)
    torch.library.opcheck(ELBO, args.op_args(backend))


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64, device=TEST_DEVICE).to(dtype).requires_grad_()


def _seed(value):
    return torch.tensor(value, dtype=torch.int64, device=TEST_DEVICE)


def test_opcheck_reparameterize_dtypes(backend):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        mu, logvar = _leaf(10, dtype=dtype), _leaf(10, dtype=dtype)
        torch.library.opcheck(REPARAMETERIZE, (mu, logvar, _seed(7), 2, backend))
    for dtype, need_mu in ((torch.float64, True), (torch.float64, False), (torch.float32, False)):
        torch.library.opcheck(REPARAMETERIZE_BACKWARD,
                              (torch.randn(30, dtype=dtype), torch.randn(10, dtype=dtype),
                               _seed(7), 3, need_mu, True, backend))


def test_opcheck_native_ops(backend):
    """The native extension's own ops (fastvae_native::*, fake impls in fastvae.backends.native)."""
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    native = torch.ops.fastvae_native
    for options in ({}, {"dtype": torch.float64, "log_scale": "SBD", "prior": "datapoint",
                         "reduction": "none", "grad_scale": True},
                    {"log_scale": None, "likelihood": "bernoulli", "prior": "shared",
                     "reduction": "sum", "x_requires_grad": False},
                    {"likelihood": "laplace", "log_scale": "1BD", "free_bits": 0.2}):
        args = elbo_args(**options).detached()
        torch.library.opcheck(native.elbo.default, args.backend_args())
    torch.library.opcheck(native.reparameterize.default,
                          (torch.randn(10), torch.randn(10), _seed(7), 3))
    torch.library.opcheck(native.reparameterize_backward.default,
                          (torch.randn(30), torch.randn(10), _seed(7), 3, False, True))


@pytest.mark.parametrize("name", ["bernoulli_shared_prior_sum_beta_grad",
                                  "log_scale_full_none_grad_scale",
                                  "laplace_shared_log_scale_none"])
def test_opcheck_native_autograd(backend, name):
    """The native ops' autograd, registered in C++ (csrc/autograd.cpp), with inputs requiring
    grad: eager against traced (aot_dispatch), and the recomputing backward ('none' with a shared
    input)."""
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    native = torch.ops.fastvae_native
    args = elbo_args(requires_grad=True, needs="api", **OPCHECK_ELBO[name])
    torch.library.opcheck(native.elbo.default, args.backend_args())
    torch.library.opcheck(native.reparameterize.default, (_leaf(10), _leaf(10), _seed(7), 3))


def test_opcheck_native_scale(backend):
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    op = torch.ops.fastvae_native.scale_.default
    extra = (None,) * (len(op._schema.arguments) - 2)  # an optional trailing argument, if any
    grads = [torch.randn(2, 5, 3), torch.randn(1, 5, 4)]
    torch.library.opcheck(op, (grads, torch.rand(5), *extra))
    torch.library.opcheck(op, ([torch.randn(7)], torch.tensor(2.0), *extra))
