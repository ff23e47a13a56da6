"""KL capacity (Burgess et al. 2018): ``loss = NLL + β·|KL_fb − C|`` per datapoint, on every
backend, against the float64 oracle (tests/oracle.py: torch.distributions' KL, plain autograd),
for C below every row's KL (every sign +1), above every one (every sign −1) and between them
(both signs in one batch); with free bits on and off, every prior layout, every reduction.

The gradient of |KL_fb − C| has a kink where a row's KL equals C: the cases keep every row at
least ``_MARGIN`` away from C (so gradcheck never straddles it), and one test puts a row on it
exactly (sign(0) = 0: no latent gradient from that row)."""
import importlib
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastvae
import oracle
from cases import ON_CUDA, TEST_DEVICE, build, cast, differentiable, generator, pick
from fastvae import backends
from op_args import OUTPUTS, elbo_args, named_outputs

F32, F64 = torch.float32, torch.float64
REDUCTIONS = ("mean", "sum", "none")
POSITIONS = ("below", "between", "above")
_MARGIN = 1e-2

# Free bits off and on × no / shared / per-row / mean-only / per-channel priors, β a float or a
# tensor requiring grad, one or several samples.
ORACLE_CASES = pick("unit_sigma", "prior_shared", "prior_datapoint", "prior_mu_only",
                    "free_bits", "free_bits_prior", "beta_tensor", "bernoulli_samples",
                    "latent_conv")


def _kl_fb(args, kwargs):
    """The oracle's per-row KL after free bits (float64, detached)."""
    rows = oracle.kl_free_bits_rows(args[2], args[3], kwargs.get("prior_mu"),
                                    kwargs.get("prior_logvar"), kwargs.get("free_bits", 0.0))
    return rows.detach().double()


def _capacity(kl_fb, position):
    """C below / above every row's KL, or in the middle of the widest gap between two rows."""
    if position == "below":
        return 0.5 * kl_fb.min().item()
    if position == "above":
        return kl_fb.max().item() + 1.0
    ordered = kl_fb.sort().values
    gaps = ordered[1:] - ordered[:-1]
    widest = int(gaps.argmax())
    return 0.5 * (ordered[widest] + ordered[widest + 1]).item()


def _checked_capacity(kl_fb, position, margin=_MARGIN):
    """``_capacity``, at least ``margin`` away from every row's KL."""
    capacity = _capacity(kl_fb, position)
    assert ((kl_fb - capacity).abs() > margin).all(), "C too close to a row's KL"
    if position == "between":
        assert (kl_fb > capacity).any() and (kl_fb < capacity).any(), "both signs wanted"
    return capacity


def _case_with_capacity(case, position, dtype=F64, seed=7, margin=_MARGIN):
    args, kwargs = build(case, dtype=dtype, generator=generator(seed))
    return args, kwargs, _checked_capacity(_kl_fb(args, kwargs), position, margin)


def _values_and_grads(fn, args, kwargs, upstream):
    out = fn(*args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(loss, [t for _, t in differentiable(args, kwargs)], upstream)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", ORACLE_CASES, ids=str)
def test_matches_the_oracle_float64(backend, case, reduction):
    """Loss, NLL, the analytic KL and every gradient (β's too), with a random upstream gradient;
    C a tensor where both signs occur, a float elsewhere. Reduction 'none' with a shared input
    (a shared prior or θ) takes the op's recompute-in-backward path."""
    for position in POSITIONS:
        args, kwargs, capacity = _case_with_capacity(case, position)
        if position == "between":
            capacity = torch.tensor(capacity, dtype=F64)
        shape = (args[0].shape[0],) if reduction == "none" else ()
        upstream = torch.randn(shape, generator=generator(3), dtype=F64)
        options = {**kwargs, "reduction": reduction, "capacity": capacity}
        terms, grads = _values_and_grads(fastvae.elbo_loss, args,
                                         {**options, "return_terms": True}, upstream)
        want, want_grads = _values_and_grads(oracle.elbo_loss, args, options, upstream)
        for name, got, expected in zip(("loss", "nll", "kl"), terms, want):
            torch.testing.assert_close(got, expected.detach(), rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{position} {name}: {m}")
        for (name, _), got, expected in zip(differentiable(args, kwargs), grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{position} grad {name}: {m}")


@pytest.mark.parametrize("position", POSITIONS)
def test_float_and_tensor_capacity_agree_bitwise(backend, position):
    """A float C is a cached 0-dim tensor in the loss dtype: the same result as that tensor."""
    args, kwargs, capacity = _case_with_capacity(pick("free_bits_prior")[0], position, dtype=F32)
    results = []
    for value in (capacity, torch.tensor(capacity, dtype=F32)):
        loss = fastvae.elbo_loss(*args, **kwargs, capacity=value, reduction="sum")
        results.append((loss, *torch.autograd.grad(loss, args[2:])))
    for got, want in zip(*results):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
def test_a_row_at_the_capacity_has_no_latent_gradient(backend, dtype, prior):
    """sign(0) = 0. With lv = lv_p = 0 a row's KL is ½Σ(μ − μ_p)², exact here: row 1 sits on
    C = 2, row 0 below it (sign −1), row 2 above it (sign +1)."""
    diff = torch.tensor([[1.0, 0.0], [2.0, 0.0], [2.0, 2.0]], dtype=dtype)
    shift = torch.tensor([0.5, -1.0], dtype=dtype) if prior else torch.zeros(2, dtype=dtype)
    mu = (diff + shift).requires_grad_()
    logvar = torch.zeros(3, 2, dtype=dtype, requires_grad=True)
    priors = {}
    if prior is not None:
        prior_mu = shift.clone() if prior == "shared" else shift.expand(3, 2).clone()
        priors = {"prior_mu": prior_mu.requires_grad_(),
                  "prior_logvar": torch.zeros_like(prior_mu).requires_grad_()}
    x = torch.zeros(3, 1, dtype=dtype)
    loss = fastvae.elbo_loss(x, x.clone(), mu, logvar, beta=0.5, capacity=2.0, reduction="none",
                             **priors)
    nll = 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(loss.double(), nll + 0.5 * torch.tensor([1.5, 0.0, 2.0], dtype=F64))
    grad_mu, grad_logvar = torch.autograd.grad(loss.sum(), (mu, logvar))
    sign = torch.tensor([[-1.0], [0.0], [1.0]], dtype=F64)
    torch.testing.assert_close(grad_mu.double(), 0.5 * sign * diff.double())
    assert torch.equal(grad_mu[1], torch.zeros(2, dtype=dtype))
    assert torch.equal(grad_logvar, torch.zeros_like(logvar))  # ½(e^0 − 1) = 0 everywhere


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("case", pick("prior_shared", "free_bits", "beta_tensor", "latent_conv"),
                         ids=str)
def test_gradcheck(backend, case, reduction):
    args, kwargs, capacity = _case_with_capacity(case, "between", seed=11)
    if case.free_bits:  # keep every dim away from the free-bits kink (as test_elbo.py does)
        kwargs = {**kwargs, "free_bits": 0.02}
        capacity = _checked_capacity(_kl_fb(args, kwargs), "between")
    names = [name for name, _ in differentiable(args, kwargs)]

    def loss(*inputs):
        bound = dict(zip(names, inputs))
        positional = [bound.get(n, a) for n, a in zip(("x", "x_hat", "mu", "logvar"), args)]
        keywords = {k: bound.get(k, v) for k, v in kwargs.items()}
        return fastvae.elbo_loss(*positional, **keywords, reduction=reduction,
                                 capacity=torch.tensor(capacity, dtype=F64))

    assert torch.autograd.gradcheck(loss, [t for _, t in differentiable(args, kwargs)],
                                    fast_mode=True)


def _max_error(got, want):
    return (got.double() - want.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [F32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", pick("prior_shared", "free_bits", "bernoulli_samples"), ids=str)
def test_low_precision_no_worse_than_pytorch(backend, case, dtype):
    """Error against float64 no worse than twice PyTorch's own in the same dtype (the suite's
    rule, tests/test_elbo.py), C between the rows (far enough from each that rounding the
    inputs cannot flip a row's sign), reduction 'none', random upstream."""
    args64, kwargs64, capacity = _case_with_capacity(case, "between", seed=9, margin=0.1)
    kwargs64 = {**kwargs64, "capacity": capacity, "reduction": "none"}
    args, kwargs = cast(args64, kwargs64, dtype)
    upstream = torch.randn(args64[0].shape[0], generator=generator(4), dtype=F64)
    want, want_grads = _values_and_grads(oracle.elbo_loss, args64, kwargs64, upstream)
    theirs, their_grads = _values_and_grads(oracle.elbo_loss, args, kwargs, upstream.to(dtype))
    got, got_grads = _values_and_grads(fastvae.elbo_loss, args, kwargs, upstream.float())
    assert got.dtype == F32
    floor = {F32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    scale = max(want[0].abs().max().item(), 1.0)
    assert _max_error(got, want[0]) <= 2 * _max_error(theirs[0], want[0]) + floor * scale
    for (name, t), g, g_torch, g_want in zip(differentiable(args, kwargs), got_grads,
                                             their_grads, want_grads):
        assert g.dtype == t.dtype, name
        scale = max(g_want.abs().max().item(), 1.0)
        assert _max_error(g, g_want) <= 2 * _max_error(g_torch, g_want) + floor * scale, name


@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
def test_every_output_matches_the_reference_at_the_backend(backend, prior):
    """Every output of the op, kl_term (= |KL_fb − C|) included, with per-row weights and free
    bits, on 300 rows (more than one chunk of the native row split), against the reference."""
    if backend == "triton" and prior != "shared" and not ON_CUDA:
        pytest.skip("under the interpreter one prior layout covers the row groups")
    args = elbo_args(batch=300, features=7, latent=5, samples=2, dtype=F64, log_scale="1BD",
                     prior=prior, free_bits=0.6, reduction="none", grad_scale=True, seed=3)
    kl_fb = named_outputs(backends.module("reference").elbo(*args.backend_args()))["kl_term"]
    args.capacity = torch.tensor(_capacity(kl_fb, "between"), dtype=F64)
    got = named_outputs(backends.module(backend).elbo(*args.backend_args()))
    want = named_outputs(backends.module("reference").elbo(*args.backend_args()))
    torch.testing.assert_close(want["kl_term"], (kl_fb - args.capacity).abs(), rtol=0, atol=0)
    for name in OUTPUTS:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("needs", [[False] * 7, [True] * 3 + [False] * 4],
                         ids=["no_gradient", "decoder_gradients"])
def test_without_latent_gradients_the_terms_are_the_same(backend, needs):
    """With no latent gradient to sign, the backends skip the pre-pass: the loss and the
    per-row terms are those of a call forming every gradient, bit for bit."""
    args = elbo_args(capacity=2.0, needs="all", free_bits=0.2, prior="shared")
    full = named_outputs(backends.module(backend).elbo(*args.backend_args()))
    args.needs_grad = needs
    got = named_outputs(backends.module(backend).elbo(*args.backend_args()))
    for name in ("loss", "nll", "kl", "kl_term"):
        assert torch.equal(got[name], full[name]), name


def test_empty_batch(backend):
    x = torch.empty(0, 3)
    x_hat = torch.empty(2, 0, 3, requires_grad=True)
    mu, logvar = torch.empty(0, 4, requires_grad=True), torch.empty(0, 4, requires_grad=True)
    for reduction, shape in (("none", (0,)), ("sum", ()), ("mean", ())):
        loss = fastvae.elbo_loss(x, x_hat, mu, logvar, capacity=torch.tensor(1.5),
                                 free_bits=0.1, reduction=reduction)
        assert loss.shape == shape
        if reduction == "sum":
            assert loss.item() == 0.0
        loss.sum().backward()
    assert x_hat.grad.shape == x_hat.shape and mu.grad.shape == mu.shape


def test_no_latent_dims(backend):
    """d = 0: KL = 0, so every row's term is |0 − C| = C, with no gradient to sign."""
    x = torch.randn(3, 4, dtype=F64)
    x_hat = torch.randn(3, 4, dtype=F64, requires_grad=True)
    empty = torch.empty(3, 0, dtype=F64, requires_grad=True)
    loss = fastvae.elbo_loss(x, x_hat, empty, empty, beta=0.5, capacity=1.5, reduction="none")
    torch.testing.assert_close(loss, fastvae.gaussian_nll(x, x_hat) + 0.75)


def test_non_contiguous_inputs(backend):
    args, kwargs, capacity = _case_with_capacity(pick("samples_datapoint")[0], "between",
                                                 dtype=F32, seed=1)
    x_hat = args[1].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    mu = torch.zeros(5, 6)[:, ::2].copy_(args[2].detach()).requires_grad_()
    logvar = args[3].detach().t().contiguous().t().requires_grad_()
    assert not (x_hat.is_contiguous() or mu.is_contiguous() or logvar.is_contiguous())
    strided = fastvae.elbo_loss(args[0], x_hat, mu, logvar, **kwargs, capacity=capacity)
    dense = fastvae.elbo_loss(*args, **kwargs, capacity=capacity)
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)
    strided.backward()
    dense.backward()
    for a, b in ((x_hat, args[1]), (mu, args[2]), (logvar, args[3])):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_module_forwards_the_capacity(backend):
    args, kwargs = build(pick("unit_sigma")[0], generator=generator(2))
    criterion = fastvae.ELBOLoss(beta=0.5, reduction="sum", capacity=1.0)
    want = fastvae.elbo_loss(*args, beta=0.5, reduction="sum", capacity=1.0)
    torch.testing.assert_close(criterion(*args), want, rtol=0, atol=0)
    assert "capacity=1.0" in repr(criterion)


def test_compiled_capacity_tensor_changes_without_recompiling(backend):
    """fullgraph=True; a new C each call (both signs occurring) compiles nothing new."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    g = generator(5)
    x = torch.randn(6, 4, generator=g)
    mu = torch.randn(6, 3, generator=g, requires_grad=True)
    logvar = (0.3 * torch.randn(6, 3, generator=g)).requires_grad_()

    def step(x, mu, logvar, capacity):
        return fastvae.elbo_loss(x, x * 0.5, mu, logvar, beta=4.0, capacity=capacity)

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    kl = fastvae.gaussian_kl(mu, logvar).detach()
    for capacity in (kl.min() * 0.5, kl.median() + 1e-3, kl.max() + 1.0):
        got = compiled(x, mu, logvar, capacity)
        want = step(x, mu, logvar, capacity)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, (mu, logvar)),
                        torch.autograd.grad(want, (mu, logvar))):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1, "changing a tensor capacity must not recompile"


OPCHECK = {
    "default": dict(),
    "datapoint_prior_free_bits": dict(log_scale=None, prior="datapoint", free_bits=0.2),
    "none_shared_prior_grad_scale": dict(reduction="none", prior="shared", grad_scale=True),
    "float64_sum_beta_grad": dict(dtype=F64, reduction="sum", beta_grad=True, prior="shared"),
}


@pytest.mark.parametrize("name", OPCHECK)
def test_opcheck(backend, name):
    args = elbo_args(requires_grad=True, needs="api", capacity=2.0, **OPCHECK[name])
    torch.library.opcheck(torch.ops.fastvae.elbo.default, args.op_args(backend))


def test_opcheck_native_op(backend):
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    for options in ({}, {"dtype": F64, "prior": "shared", "free_bits": 0.2, "reduction": "none"}):
        args = elbo_args(capacity=2.0, **options).detached()
        torch.library.opcheck(torch.ops.fastvae_native.elbo.default, args.backend_args())


@pytest.mark.parametrize("capacity, message", [
    (torch.ones(2), r"capacity must be a one-element floating tensor"),
    (torch.tensor(1), r"capacity must be a one-element floating tensor"),
])
def test_native_op_checks_the_capacity(backend, capacity, message):
    if backend != "native":
        pytest.skip("the native op's own checks")
    args = elbo_args().detached().replace(capacity=capacity.to(TEST_DEVICE))
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastvae_native.elbo(*args.backend_args())


BAD_CAPACITIES = [
    ("negative", -0.5, ValueError, r"capacity must be >= 0"),
    ("nan", float("nan"), ValueError, r"capacity must not be NaN"),
    ("infinite", math.inf, ValueError, r"capacity must be finite"),
    ("string", "1", TypeError, r"capacity must be a real number, got str"),
    ("bool", True, TypeError, r"capacity must be a real number, got bool"),
    ("1-dim tensor", lambda: torch.ones(1), ValueError,
     r"capacity must be a float or a 0-dim tensor, got shape \(1,\)"),
    ("integer tensor", lambda: torch.tensor(1), TypeError, r"capacity must have a floating dtype"),
    ("requires grad", lambda: torch.tensor(1.0, requires_grad=True), ValueError,
     r"capacity must not require grad: its gradient is not implemented"),
]


@pytest.mark.parametrize("capacity, error, message", [c[1:] for c in BAD_CAPACITIES],
                         ids=[c[0] for c in BAD_CAPACITIES])
def test_bad_capacity_raises_before_any_kernel(backend, monkeypatch, capacity, error, message):
    def no_kernel(*args):
        raise AssertionError("a kernel ran before the capacity was rejected")

    monkeypatch.setattr(backends.module(backend), "elbo", no_kernel)
    capacity = capacity() if callable(capacity) else capacity
    x, mu = torch.randn(4, 6), torch.randn(4, 3)
    with pytest.raises(error, match=message):
        fastvae.elbo_loss(x, x, mu, mu, capacity=capacity)
    with pytest.raises(error, match=message):
        fastvae.ELBOLoss(capacity=capacity)


def test_value_checking_mode_checks_a_capacity_tensor(backend):
    x, mu = torch.randn(4, 6), torch.randn(4, 3)
    capacity = torch.tensor(float("inf"))
    fastvae.elbo_loss(x, x, mu, mu, capacity=capacity)  # the mode is off: nothing is checked
    with fastvae.validate_values(), pytest.raises(ValueError,
                                                  match=r"^capacity must be finite, got inf"):
        fastvae.elbo_loss(x, x, mu, mu, capacity=capacity)


def test_triton_launches_the_pre_pass_only_with_a_capacity_and_latent_gradients(backend,
                                                                                 monkeypatch):
    if backend != "triton":
        pytest.skip("counts the Triton backend's launches")
    kernels = importlib.import_module("fastvae.kernels.elbo")
    launched = []
    original = kernels.launch
    monkeypatch.setattr(kernels, "launch",
                        lambda kernel, *a, **k: launched.append(kernel) or original(kernel, *a, **k))
    for capacity, needs in ((None, "all"), (2.0, [True, True, True] + [False] * 4), (2.0, "all")):
        launched.clear()
        args = elbo_args(capacity=capacity, needs=needs, prior="shared")
        backends.module(backend).elbo(*args.backend_args())
        assert launched.count(kernels._kl_row_kernel) == (capacity is not None and needs == "all")
        assert len(launched) == 2 + launched.count(kernels._kl_row_kernel)
