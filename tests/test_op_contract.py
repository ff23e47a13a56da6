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


# From mutation testing: the reparameterize backward at the backend level, and the op layer's
# recomputation in backward for every reduction.
@pytest.mark.parametrize("dtype", [BF16, F16, F32, F64])
@pytest.mark.parametrize("need_mu, need_logvar", [(True, True), (True, False), (False, True)])
def test_reparameterize_backward_dtypes_and_accuracy_at_the_backend(backend, dtype, need_mu,
                                                                    need_logvar):
    """Gradients in logvar's dtype; a 16-bit one formed in float32 and rounded once (within one
    unit in the last place of the exact value); an unneeded one is empty."""
    from fastvae import _philox
    g = generator(11)
    samples, numel = 8, 64
    logvar = torch.randn(numel, generator=g, device=TEST_DEVICE).to(dtype)
    grad_z = torch.randn(samples * numel, generator=g, device=TEST_DEVICE).to(dtype)
    seed = torch.tensor(321, device=TEST_DEVICE)
    grad_mu, grad_logvar = backends.module(backend).reparameterize_backward(
        grad_z, logvar, seed, samples, need_mu, need_logvar)
    upstream = grad_z.double().view(samples, numel)
    eps = _philox.normal_stream(seed.cpu(), samples * numel).double().view(samples, numel)
    exact = {"mu": upstream.sum(0),
             "logvar": (upstream * eps).sum(0) * 0.5 * torch.exp(0.5 * logvar.double()).cpu()}
    # one ulp for 16-bit; float32 noise and sums otherwise
    rtol, atol = {BF16: (2**-8, 2**-16), F16: (2**-11, 2**-19), F32: (1e-5, 1e-6),
                  F64: (1e-5, 1e-6)}[dtype]
    for name, got, needed in (("mu", grad_mu, need_mu), ("logvar", grad_logvar, need_logvar)):
        assert got.dtype == dtype, name
        if not needed:
            assert got.numel() == 0, name
            continue
        assert got.shape == (numel,)
        torch.testing.assert_close(got.double().cpu(), exact[name].cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradients_recomputed_in_backward_equal_those_formed_in_forward(backend, reduction,
                                                                        batch):
    """With no gradient requested from forward (needs_grad all false), the op layer recomputes
    every gradient in backward; they equal the ones formed in forward, for every reduction."""
    from fastvae import _ops
    grads = []
    for needs in ("api", [False] * 7):
        args = elbo_args(batch=batch, dtype=F64, prior="datapoint", log_scale="SBD",
                         reduction=reduction, requires_grad=True, needs=needs)
        loss = _ops.elbo(*args.backend_args(), device=torch.device(TEST_DEVICE)).loss
        upstream = torch.linspace(0.5, 2.0, loss.numel(), dtype=F64, device=loss.device)
        leaves = [t for t in args.inputs.values() if t is not None and t.requires_grad]
        grads.append(torch.autograd.grad(loss, leaves, upstream.view(loss.shape)))
    for formed, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, formed)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_reparameterize_forward_of_16_bit_inputs_is_rounded_once(backend, dtype):
    """z of 16-bit mu, logvar is formed in float32 and rounded once to their dtype: within one
    unit in the last place of the exact value."""
    from fastvae import _philox
    g = generator(12)
    samples, numel = 4, 256
    mu, logvar = (torch.randn(numel, generator=g, device=TEST_DEVICE).to(dtype) for _ in range(2))
    seed = torch.tensor(99, device=TEST_DEVICE)
    z = backends.module(backend).reparameterize_forward(mu, logvar, seed, samples)
    assert z.dtype == dtype and z.shape == (samples * numel,)
    eps = _philox.normal_stream(seed.cpu(), samples * numel).double().view(samples, numel)
    exact = mu.double().cpu() + torch.exp(0.5 * logvar.double().cpu()) * eps
    ulp = {BF16: 2**-8, F16: 2**-11}[dtype]
    torch.testing.assert_close(z.double().cpu().view(samples, numel), exact, rtol=ulp, atol=ulp / 64)


@pytest.mark.parametrize("layout", [l for l in LAYOUTS if l], ids=lambda l: f"theta_{l}")
def test_log_scale_gradient_keeps_the_log_scale_shape(backend, layout):
    out = _run(backend, elbo_args(log_scale=layout, dtype=F64))
    assert out["grad_x_log_scale"].shape == tuple({"S": 2, "B": 5, "D": 6, "1": 1}[c] for c in layout)


# θ as its 3-D layout and as the shorter shape the op is given instead, its leading size-1 dims
# left out (with one sample, x_hat comes as [B, D] too).
SHORT_THETA = [("1BD", "BD"), ("11D", "D"), ("11D", "1D"), ("1B1", "B1"), ("111", ""),
               ("111", "1")]


@pytest.mark.parametrize("samples", [1, 2])
@pytest.mark.parametrize("layout, short", SHORT_THETA, ids=lambda l: l or "scalar")
def test_one_sample_and_theta_without_leading_unit_dims(backend, layout, short, samples):
    """The op takes x_hat [B, D] for one sample and θ with its leading size-1 dims left out,
    so the public API makes no view: the outputs equal those of the 3-D call to the bit, and
    each gradient comes in the shape its input was given."""
    args = elbo_args(samples=samples, log_scale=layout, dtype=F64, prior="shared")
    full = {"B": 5, "D": 6, "1": 1}
    short_args = args.replace(inputs={
        **args.inputs, "x_log_scale": args.inputs["x_log_scale"].reshape([full[c] for c in short]),
        "x_hat": args.inputs["x_hat"][0] if samples == 1 else args.inputs["x_hat"]})
    got, want = _run(backend, short_args), _run(backend, args)
    for name in OUTPUTS:
        given = short_args.inputs.get(name[len("grad_"):])
        expected = want[name] if given is None else want[name].reshape(given.shape)
        assert got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), name


@pytest.mark.parametrize("x_hat_of, theta_of, message", [
    (lambda t: t[0], lambda t: t, r"x_log_scale must have at most x_hat's 2 dims"),
    (lambda t: t[0, 0], None, r"x_hat must be \[B, D\] or \[S, B, D\]"),
    (lambda t: t[None], None, r"x_hat must be \[B, D\] or \[S, B, D\]"),
], ids=["theta 3-D, x_hat 2-D", "x_hat 1-D", "x_hat 4-D"])
def test_native_op_refuses_decoder_shapes_it_cannot_view(backend, x_hat_of, theta_of, message):
    """Each is refused with a message before any kernel runs (x_hat [1, B, D], θ [1, B, D])."""
    if backend != "native":
        pytest.skip("the native op's own checks")
    args = elbo_args(samples=1, log_scale="1BD").detached()
    inputs = {**args.inputs, "x_hat": x_hat_of(args.inputs["x_hat"]),
              "x_log_scale": None if theta_of is None else theta_of(args.inputs["x_log_scale"])}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastvae_native.elbo(*args.replace(inputs=inputs).backend_args())


def test_opcheck_native_op_of_one_sample_and_a_short_theta(backend):
    """The raw native op with x_hat [B, D] and θ [D], inputs requiring grad: schema, fake
    shapes and autograd registration agree (the gradients come back in the given shapes)."""
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    args = elbo_args(samples=1, log_scale="11D", requires_grad=True, needs="api")
    inputs = {**args.inputs, "x_hat": args.inputs["x_hat"].detach()[0].requires_grad_(),
              "x_log_scale": args.inputs["x_log_scale"].detach().reshape(-1).requires_grad_()}
    torch.library.opcheck(torch.ops.fastvae_native.elbo.default,
                          args.replace(inputs=inputs).backend_args())
