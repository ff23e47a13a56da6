"""The backend contract (fastvae/backends/reference.py), checked at the backend level where
autograd does not cast or reshape anything: output and gradient dtypes and shapes, large
batches against the reference for every layout, and ``scale_``."""
import pytest
import torch

from cases import ON_CUDA, TEST_DEVICE, generator
from fastvae import backends
from fastvae._common import INPUTS
from op_args import OUTPUTS, elbo_args, named_outputs

LAYOUTS = ["SBD", "SB1", "S1D", "S11", "1BD", "1B1", "11D", "111", None]
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _run(backend, args):
    return named_outputs(backends.module(backend).elbo(*args.backend_args()))


# (x, x_hat, x_log_scale, latents): every input of the loss may bring its own dtype.
DTYPES = [(F32, BF16, F32, F32), (BF16, BF16, F16, BF16), (F32, F64, BF16, F16),
          (F16, F32, F64, F32), (F64, F64, F64, F64)]


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace", "bernoulli"])
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(str(t)[6:] for t in d))
def test_output_and_gradient_dtypes_at_the_backend(backend, dtypes, likelihood):
    """Each gradient in its own input's dtype and shape (autograd would cast a wrong one back,
    so only this level can see it); the loss and rows in the accumulation dtype; unused
    gradient slots empty."""
    x_dtype, hat_dtype, theta_dtype, latent_dtype = dtypes
    layout = None if likelihood == "bernoulli" else "1BD"
    args = elbo_args(dtype=x_dtype, hat_dtype=hat_dtype, latent_dtype=latent_dtype,
                     log_scale=layout, prior="shared", likelihood=likelihood, free_bits=0.2,
                     needs=[True, True, layout is not None, True, False, True, True])
    if layout is not None:
        args.inputs["x_log_scale"] = args.inputs["x_log_scale"].to(theta_dtype)
    acc = F64 if F64 in (x_dtype, hat_dtype, latent_dtype) or (
        layout is not None and theta_dtype == F64) else F32
    args.beta = args.beta.to(acc)
    got = _run(backend, args)
    for name in ("loss", "nll", "kl", "kl_term"):
        assert got[name].dtype == acc, (name, got[name].dtype)
    for name, need in zip(INPUTS, args.needs_grad):
        grad, tensor = got[f"grad_{name}"], args.inputs[name]
        if need:
            assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, (name, grad.dtype)
        else:
            assert grad.numel() == 0, name
    want = _run("reference", args)
    tolerance = 1e-12 if acc == F64 and all(t == F64 for t in dtypes) else 1e-2
    for name in OUTPUTS:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"theta_{l}")
def test_large_batch_matches_the_reference(backend, layout, prior):
    """B = 300 rows: more than one chunk of every backend's row split (native: 256 rows), so
    the cross-chunk sums (a shared θ or prior, the free-bits column means) are exercised; in
    float64 against the reference, with per-row weights and free bits."""
    if backend == "triton" and prior != "shared" and not ON_CUDA:
        pytest.skip("under the interpreter (seconds per call) one prior layout covers the row "
                    "groups; test_triton.py runs every layout on a multi-program grid")
    likelihood = "laplace" if layout in ("S1D", "1B1", "111") else "gaussian"
    args = elbo_args(batch=300, features=7, latent=5, samples=2, dtype=F64, log_scale=layout,
                     prior=prior, likelihood=likelihood, free_bits=0.6, reduction="none",
                     grad_scale=True, seed=3)
    got, want = _run(backend, args), _run("reference", args)
    assert not torch.equal(want["kl"], want["kl_term"]), "free bits should clamp some dims"
    for name in OUTPUTS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_large_batch_bernoulli_shared_prior(backend, reduction):
    args = elbo_args(batch=513, features=5, latent=4, samples=1, dtype=F64, log_scale=None,
                     prior="shared", likelihood="bernoulli", free_bits=0.3, reduction=reduction,
                     beta_grad=True, seed=4)
    got, want = _run(backend, args), _run("reference", args)
    for name in OUTPUTS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# scale_(grads, upstream)
# ----------------------------------------------------------------------------------------------
def _grads(dtypes, batch=None, seed=0):
    """Contiguous gradients, ``[L, B, T]`` views when ``batch`` is given."""
    g = generator(seed)
    shapes = [(2, batch, 5), (1, batch, 3), (1, batch, 1)] if batch else [(7,), (2, 3, 4), (1,)]
    return [torch.randn(shape, generator=g, device=TEST_DEVICE).to(dtype)
            for shape, dtype in zip(shapes, dtypes)]


def _expected(grad, upstream):
    """g · upstream in float32 (float64 for float64 gradients), rounded once."""
    acc = F64 if grad.dtype == F64 else F32
    factor = upstream.to(acc).view((1, -1, 1) if upstream.dim() else ())
    return (grad.to(acc) * factor).to(grad.dtype)


def _ulps(dtype):
    return {F32: dict(rtol=3e-7, atol=1e-30), F64: dict(rtol=1e-15, atol=1e-300),
            BF16: dict(rtol=2 ** -8, atol=1e-30), F16: dict(rtol=2 ** -11, atol=1e-7)}[dtype]


SCALE_DTYPES = [(F32, F32, F32), (BF16, F32, F16), (F64, F64, F64)]
DTYPE_IDS = lambda d: "-".join(str(t)[6:] for t in d)  # noqa: E731


@pytest.mark.parametrize("dtypes", SCALE_DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("upstream", [3.0, 0.25, -1.5, 0.0, 1.0])
def test_scale_by_a_scalar(backend, dtypes, upstream):
    """Every element times the upstream gradient; at 1 the gradients stay bitwise as they
    are (nothing written)."""
    acc = F64 if F64 in dtypes else F32
    grads = _grads(dtypes)
    before = [g.clone() for g in grads]
    backends.module(backend).scale_(grads, torch.tensor(upstream, dtype=acc))
    for got, original in zip(grads, before):
        torch.testing.assert_close(got, _expected(original, torch.tensor(upstream)),
                                   **_ulps(got.dtype))
        if upstream == 1.0:
            assert torch.equal(got, original)


@pytest.mark.parametrize("dtypes", SCALE_DTYPES, ids=DTYPE_IDS)
def test_scale_per_row(backend, dtypes):
    """A ``[B]`` upstream scales row b (dim 1 of each ``[L, B, T]`` view) by its weight; the
    rows whose weight is 1 stay bitwise as they are. B = 300: more rows than one block."""
    acc = F64 if F64 in dtypes else F32
    batch = 300
    grads = _grads(dtypes, batch=batch, seed=2)
    before = [g.clone() for g in grads]
    upstream = torch.rand(batch, generator=generator(3), device=TEST_DEVICE).to(acc) * 4 - 2
    upstream[1::7] = 0.0
    upstream[::3] = 1.0
    backends.module(backend).scale_(grads, upstream)
    for got, original in zip(grads, before):
        torch.testing.assert_close(got, _expected(original, upstream), **_ulps(got.dtype))
        assert torch.equal(got[:, ::3], original[:, ::3])


def test_scale_of_nothing(backend):
    backends.module(backend).scale_([], torch.tensor(2.0))
    grads = [torch.empty(2, 0, 3), torch.empty(1, 0, 1)]
    backends.module(backend).scale_(grads, torch.rand(0))
    assert [g.shape for g in grads] == [(2, 0, 3), (1, 0, 1)]
