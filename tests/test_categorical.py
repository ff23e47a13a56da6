"""The categorical likelihood on every backend: categorical_nll and elbo_loss(likelihood=
'categorical') against torch.distributions.Categorical and F.cross_entropy in float64 (values
and gradients, both layouts, with and without samples, K up to 4096, int64 and uint8 targets),
gradcheck, half precision against PyTorch's own error, edge cases, torch.compile, opcheck and
the errors of bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as dist
from torch._dynamo.testing import CompileCounterWithBackend

import fastvae
import oracle
from cases import TEST_DEVICE, generator
from conftest import intra_op_threads

REDUCTIONS = ["none", "mean", "sum"]
LAYOUTS = {"last": -1, "second": 1}  # layout name -> class_dim
# (K, event): B·D kept small where K is large.
SIZES = [(2, (2, 3)), (3, (4,)), (17, (2, 3)), (256, (3,)), (4096, ())]


def inputs(layout, classes, event, samples=None, target_dtype=torch.int64, dtype=torch.float64,
           batch=3, seed=0, scale=2.0):
    """(target, logits): logits ``[(S,) B, *event, K]`` or ``[(S,) B, K, *event]`` requiring
    grad, targets in [0, min(K, 256)) for uint8."""
    g = generator(seed)
    lead = (batch,) if samples is None else (samples, batch)
    shape = (*lead, *event, classes) if layout == "last" else (*lead, classes, *event)
    logits = torch.randn(shape, generator=g, dtype=torch.float64, device=TEST_DEVICE) * scale
    high = min(classes, 256) if target_dtype == torch.uint8 else classes
    target = torch.randint(0, high, (batch, *event), generator=g, device=TEST_DEVICE)
    return target.to(target_dtype), logits.to(dtype).requires_grad_()


def _has_samples(target, logits):
    return logits.dim() - target.dim() - 1


def categorical_rows(target, logits, class_dim=-1):
    """[B] with torch.distributions: −log p summed over event dims, averaged over samples."""
    lead = 1 + _has_samples(target, logits)
    if class_dim == 1:
        logits = logits.movedim(lead, -1)
    log_prob = dist.Categorical(logits=logits).log_prob(target.long().expand(logits.shape[:-1]))
    rows = -log_prob.reshape(*log_prob.shape[:lead], -1).sum(-1)
    return rows.mean(0) if lead == 2 else rows


def cross_entropy_rows(target, logits, class_dim=-1):
    """[B] with F.cross_entropy(reduction='none'), in the logits' dtype."""
    if not _has_samples(target, logits):
        logits = logits.unsqueeze(0)
    samples = logits.shape[0]
    flat = logits.flatten(0, 1)
    if class_dim == -1:
        flat = flat.movedim(-1, 1)
    flat_target = target.long().expand(samples, *target.shape).flatten(0, 1)
    per_element = F.cross_entropy(flat, flat_target, reduction="none")
    return per_element.reshape(samples, target.shape[0], -1).sum(-1).mean(0)


def with_grad(loss, logits, upstream):
    """(loss, its gradient with respect to logits for the upstream gradient)."""
    return loss, torch.autograd.grad(loss, logits, upstream)[0]


def upstream_for(reduction, batch, dtype=torch.float64):
    shape = (batch,) if reduction == "none" else ()
    return torch.randn(shape, generator=generator(3), dtype=torch.float64,
                       device=TEST_DEVICE).to(dtype)


# ----------------------------------------------------------------------------------------------
# values and gradients against the float64 oracles
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8], ids=["int64", "uint8"])
@pytest.mark.parametrize("samples", [None, 2], ids=["no_samples", "samples"])
@pytest.mark.parametrize("classes,event", SIZES, ids=[f"K{k}" for k, _ in SIZES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_categorical_and_cross_entropy(backend, layout, classes, event, samples,
                                                target_dtype, reduction):
    class_dim = LAYOUTS[layout]
    target, logits = inputs(layout, classes, event, samples, target_dtype)
    upstream = upstream_for(reduction, target.shape[0])
    got, got_grad = with_grad(fastvae.categorical_nll(target, logits, class_dim=class_dim,
                                                      reduction=reduction), logits, upstream)
    want, want_grad = with_grad(oracle.reduce(categorical_rows(target, logits, class_dim),
                                              reduction), logits, upstream)
    entropy = oracle.reduce(cross_entropy_rows(target, logits, class_dim), reduction)
    assert got.dtype == torch.float64 and got_grad.dtype == torch.float64
    torch.testing.assert_close(want, entropy, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want.detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float32_and_extreme_logits(backend, layout):
    """float32 logits spread over ±400 (a naive exp overflows): within float32 rounding."""
    target, logits64 = inputs(layout, 300, (2,), samples=2, scale=200.0)
    logits = logits64.detach().float().requires_grad_()
    upstream = upstream_for("none", 3)
    got, got_grad = with_grad(fastvae.categorical_nll(target, logits, class_dim=LAYOUTS[layout]),
                              logits, upstream.float())
    want, want_grad = with_grad(categorical_rows(target, logits64, LAYOUTS[layout]), logits64,
                                upstream)
    assert got.dtype == torch.float32 and got_grad.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("classes,positions", [(17, 4000), (256, 4100)], ids=["K17", "K256"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_many_blocks_and_a_streamed_gradient(backend, layout, classes, positions):
    """Several blocks or tiles per row (a partial one last) and, at K = 256, a gradient of
    8 MB, large enough to be written around the cache: against the reference in float32."""
    class_dim = LAYOUTS[layout]
    target, logits = inputs(layout, classes, (positions,), batch=2, dtype=torch.float32,
                            seed=15)
    upstream = upstream_for("none", 2, torch.float32)
    got, got_grad = with_grad(fastvae.categorical_nll(target, logits, class_dim=class_dim),
                              logits, upstream)
    with fastvae.use_backend("reference"):
        want, want_grad = with_grad(fastvae.categorical_nll(target, logits, class_dim=class_dim),
                                    logits, upstream)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("samples", [None, 3], ids=["no_samples", "samples"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(backend, layout, samples, reduction):
    target, logits = inputs(layout, 5, (2, 3), samples, batch=2, seed=4)

    def loss(values):
        return fastvae.categorical_nll(target, values, class_dim=LAYOUTS[layout],
                                       reduction=reduction)

    assert torch.autograd.gradcheck(loss, (logits,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_low_precision_no_worse_than_pytorch(backend, layout, dtype):
    """Error against float64 no worse than twice F.cross_entropy's own in the same dtype."""
    class_dim = LAYOUTS[layout]
    target, logits64 = inputs(layout, 256, (2, 3), samples=2, seed=6)
    logits = logits64.detach().to(dtype).requires_grad_()
    exact = logits.detach().double().requires_grad_()  # the rounded values, in float64
    upstream = upstream_for("none", 3)
    want, want_grad = with_grad(categorical_rows(target, exact, class_dim), exact, upstream)
    torch_out, torch_grad = with_grad(cross_entropy_rows(target, logits, class_dim), logits,
                                      upstream.to(dtype))
    got, got_grad = with_grad(fastvae.categorical_nll(target, logits, class_dim=class_dim),
                              logits, upstream.float())
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    floor = {torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]

    def error(a, b):
        return (a.double() - b.double()).abs().max().item()

    loss_scale = max(want.abs().max().item(), 1.0)
    assert error(got, want) <= 2 * error(torch_out, want) + floor * loss_scale
    grad_scale = max(want_grad.abs().max().item(), 1.0)
    assert error(got_grad, want_grad) <= 2 * error(torch_grad, want_grad) + floor * grad_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backend_matches_reference_with_grad_scale(backend, layout, dtype):
    """The backend function itself against the reference: row weights, every reduction, with
    and without the gradient, uint8 targets, one of them out of range (its row NaN)."""
    from fastvae import backends
    target, logits = inputs(layout, 19, (7,), samples=2, target_dtype=torch.uint8, dtype=dtype)
    logits = logits.detach()  # [S, B, D, K] or [S, B, K, D] as the op takes them
    target[2, 3] = 19
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(3, generator=generator(16), device=TEST_DEVICE).to(acc)
    tolerance = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else {}
    for reduction in (0, 1, 2):
        for grad_scale, needs in ((weights, [True]), (None, [True]), (None, [False])):
            args = (logits, target, grad_scale, layout == "last", reduction, needs)
            got = backends.module(backend).categorical(*args)
            want = backends.module("reference").categorical(*args)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape
                torch.testing.assert_close(g, w, equal_nan=True, **tolerance)


# ----------------------------------------------------------------------------------------------
# elbo_loss(likelihood='categorical')
# ----------------------------------------------------------------------------------------------
def _latents(batch, prior, seed=8):
    g = generator(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64, device=TEST_DEVICE)
                * scale).requires_grad_()

    mu = leaf(batch, 4) * torch.linspace(0.1, 2.0, 4, dtype=torch.float64, device=TEST_DEVICE)
    mu = mu.detach().requires_grad_()
    latents = {"mu": mu, "logvar": leaf(batch, 4, scale=0.5)}
    if prior == "shared":
        latents.update(prior_mu=leaf(4, scale=0.3), prior_logvar=leaf(4, scale=0.3))
    return latents


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [dict(), dict(beta=0.3, prior="shared"),
                                     dict(free_bits=0.6, samples=2),
                                     dict(beta="tensor", free_bits=0.6, prior="shared")],
                         ids=["plain", "beta_prior", "free_bits_samples", "all"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_elbo_matches_distributions(backend, layout, options, reduction):
    class_dim = LAYOUTS[layout]
    target, logits = inputs(layout, 7, (2, 3), options.get("samples"), batch=4, seed=9)
    latents = _latents(4, options.get("prior"))
    beta = options.get("beta", 1.0)
    if beta == "tensor":
        beta = torch.tensor(0.7, dtype=torch.float64, device=TEST_DEVICE).requires_grad_()
    free_bits = options.get("free_bits", 0.0)
    leaves = [logits, *latents.values()] + ([beta] if isinstance(beta, torch.Tensor) else [])
    upstream = upstream_for(reduction, 4)

    terms = fastvae.elbo_loss(target, logits, latents["mu"], latents["logvar"],
                              likelihood="categorical", class_dim=class_dim, beta=beta,
                              free_bits=free_bits, prior_mu=latents.get("prior_mu"),
                              prior_logvar=latents.get("prior_logvar"), reduction=reduction,
                              return_terms=True)
    empty = torch.empty(4, 0, dtype=torch.float64, device=TEST_DEVICE)
    kl_loss, _, kl = oracle.elbo_loss(empty, empty, latents["mu"], latents["logvar"],
                                      beta=beta, free_bits=free_bits,
                                      prior_mu=latents.get("prior_mu"),
                                      prior_logvar=latents.get("prior_logvar"),
                                      reduction=reduction)
    nll = oracle.reduce(categorical_rows(target, logits, class_dim), reduction)
    want = nll + kl_loss
    torch.testing.assert_close(terms.loss, want.detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(terms.nll, nll.detach(), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(terms.kl, kl.detach(), rtol=1e-11, atol=1e-11)
    got_grads = torch.autograd.grad(terms.loss, leaves, upstream)
    want_grads = torch.autograd.grad(want, leaves, upstream)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_elbo_float32_loss_dtype(backend):
    target, logits = inputs("second", 4, (3,), dtype=torch.float32)
    latents = _latents(3, None)
    loss = fastvae.elbo_loss(target, logits, latents["mu"].float(), latents["logvar"].float(),
                             likelihood="categorical", class_dim=1)
    assert loss.dtype == torch.float32 and loss.shape == ()
    loss.backward()
    assert logits.grad.dtype == torch.float32 and logits.grad.shape == logits.shape


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_and_event(backend, layout):
    class_dim = LAYOUTS[layout]
    for batch, event in ((0, (3,)), (2, (0,)), (0, ())):
        target, logits = inputs(layout, 5, event, samples=2, batch=batch)
        for reduction, shape in (("none", (batch,)), ("sum", ()), ("mean", ())):
            loss = fastvae.categorical_nll(target, logits, class_dim=class_dim,
                                           reduction=reduction)
            assert loss.shape == shape
            if reduction == "sum" or (reduction == "mean" and batch):
                assert loss.item() == 0.0
            (grad,) = torch.autograd.grad(loss.sum(), logits)
            assert grad.shape == logits.shape and not grad.any()


def test_one_class_and_no_event_dims(backend):
    """K = 1: every NLL is 0 and so is the gradient; a target [B] takes logits [B, K]."""
    target, logits = inputs("last", 1, (4,))
    loss = fastvae.categorical_nll(target, logits, reduction="sum")
    assert loss.item() == 0.0
    assert not torch.autograd.grad(loss, logits)[0].any()
    target, logits = inputs("last", 6, ())
    for class_dim in (1, -1):  # the same layout when there is no event dim
        got = fastvae.categorical_nll(target, logits, class_dim=class_dim)
        torch.testing.assert_close(got, F.cross_entropy(logits, target, reduction="none"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_logits(backend, layout):
    """A transposed view of the logits gives the result and gradient of a contiguous copy."""
    class_dim = LAYOUTS[layout]
    target, logits = inputs(layout, 6, (3, 4), seed=12)
    view = logits.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    assert not view.is_contiguous()
    upstream = upstream_for("none", 3)
    got, got_grad = with_grad(fastvae.categorical_nll(target, view, class_dim=class_dim), view,
                              upstream)
    want, want_grad = with_grad(fastvae.categorical_nll(target, logits, class_dim=class_dim),
                                logits, upstream)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    strided_target = torch.stack([target, target], -1)[..., 0]
    assert not strided_target.is_contiguous()
    torch.testing.assert_close(fastvae.categorical_nll(strided_target, logits,
                                                       class_dim=class_dim), want)


def test_other_integer_targets_are_widened(backend):
    target, logits = inputs("second", 9, (5,))
    want = fastvae.categorical_nll(target, logits, class_dim=1)
    for dtype in (torch.int32, torch.int16, torch.int8):
        torch.testing.assert_close(fastvae.categorical_nll(target.to(dtype), logits, class_dim=1),
                                   want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_target_out_of_range_is_nan_not_a_read(backend, layout):
    """Outside the value-checking mode a bad target makes its row NaN (and its gradient) and
    leaves the other rows as they are."""
    class_dim = LAYOUTS[layout]
    target, logits = inputs(layout, 5, (2, 3), samples=2)
    bad = target.clone()
    bad[1, 0, 2] = 5 if layout == "last" else 200
    bad[2, 1, 1] = -1
    got = fastvae.categorical_nll(bad, logits, class_dim=class_dim)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    want = fastvae.categorical_nll(target, logits, class_dim=class_dim)
    assert torch.isnan(got[1:]).all() and got[0] == want[0]
    assert torch.isnan(grad[:, 1:]).any() and not torch.isnan(grad[:, 0]).any()


def test_retained_graph_second_backward(backend):
    """reduction 'none': the first backward scales the [S, B, D, K] buffers per row in place, a
    second one through the retained graph returns new tensors."""
    target, logits = inputs("last", 4, (2,), samples=2)
    loss = fastvae.categorical_nll(target, logits)
    first, second = upstream_for("none", 3), torch.rand(3, dtype=torch.float64) + 0.5
    want = categorical_rows(target, logits)
    (g1,) = torch.autograd.grad(loss, logits, first, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits, second)
    torch.testing.assert_close(g1, torch.autograd.grad(want, logits, first, retain_graph=True)[0])
    torch.testing.assert_close(g2, torch.autograd.grad(want, logits, second)[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bitwise_repeatable_and_across_thread_counts(backend, layout):
    """The same loss and gradient on a repeat and (CPU) with 1 and 2 intra-op threads: the
    blocks' partial sums are added in a fixed order."""
    target, logits = inputs(layout, 33, (40,), samples=2, batch=8, dtype=torch.float32, seed=13)

    def run():
        loss = fastvae.categorical_nll(target, logits, class_dim=LAYOUTS[layout], reduction="sum")
        return loss, torch.autograd.grad(loss, logits)[0]

    if TEST_DEVICE.type != "cpu":
        runs = [run(), run()]
    else:
        runs = []
        for threads in (1, 2, 2):
            with intra_op_threads(threads):
                runs.append(run())
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_no_gradient_formed_without_grad(backend):
    target, logits = inputs("last", 5, (3,))
    with torch.no_grad():
        loss = fastvae.categorical_nll(target, logits)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, categorical_rows(target, logits).detach())


# ----------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_matches_eager(backend, layout):
    class_dim = LAYOUTS[layout]
    target, logits = inputs(layout, 6, (2, 3), samples=2, dtype=torch.float32)
    latents = {k: v.detach().float().requires_grad_() for k, v in _latents(3, None).items()}

    def step(target, logits, mu, logvar, beta):
        nll = fastvae.categorical_nll(target, logits, class_dim=class_dim, reduction="none")
        elbo = fastvae.elbo_loss(target, logits, mu, logvar, likelihood="categorical",
                                 class_dim=class_dim, beta=beta, free_bits=0.1)
        return nll, elbo

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    leaves = [logits, latents["mu"], latents["logvar"]]
    upstream = upstream_for("none", 3, torch.float32)
    for beta in (0.5, 0.9):
        beta = torch.tensor(beta)
        outs = [fn(target, *leaves, beta) for fn in (step, compiled)]
        grads = [torch.autograd.grad(nll.mul(upstream).sum() + elbo, leaves)
                 for nll, elbo in outs]
        for got, want in zip(outs[1], outs[0]):
            torch.testing.assert_close(got, want)
        for got, want in zip(grads[1], grads[0]):
            torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def _op_args(layout, reduction, grad_scale, dtype=torch.float32, samples=2):
    target, logits = inputs(layout, 7, (5,), samples, dtype=dtype, seed=14)
    weights = torch.rand(3, device=TEST_DEVICE, dtype=torch.float64 if dtype == torch.float64
                         else torch.float32) if grad_scale else None
    return logits, target, weights, layout == "last", reduction, [True]


OPCHECK = {"last_none": ("last", 0, False), "second_mean_grad_scale": ("second", 1, True),
           "second_sum": ("second", 2, False), "last_mean_float64": ("last", 1, False)}


@pytest.mark.parametrize("name", OPCHECK)
def test_opcheck(backend, name):
    layout, reduction, grad_scale = OPCHECK[name]
    dtype = torch.float64 if "float64" in name else torch.float32
    logits, target, weights, classes_last, reduction, needs = _op_args(layout, reduction,
                                                                       grad_scale, dtype)
    logits = logits.detach().requires_grad_()
    target = target.reshape(3, -1)
    torch.library.opcheck(torch.ops.fastvae.categorical.default,
                          (logits, target, weights, classes_last, reduction, needs, backend))


def test_opcheck_native(backend):
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    for layout, reduction, grad_scale in OPCHECK.values():
        logits, target, weights, classes_last, reduction, _ = _op_args(layout, reduction,
                                                                       grad_scale)
        for needs in ([True], [False]):
            torch.library.opcheck(torch.ops.fastvae_native.categorical.default,
                                  (logits.detach(), target.reshape(3, -1).to(torch.uint8),
                                   weights, classes_last, reduction, needs))
        # with logits requiring grad: the op's C++ autograd
        torch.library.opcheck(torch.ops.fastvae_native.categorical.default,
                              (logits.detach().requires_grad_(), target.reshape(3, -1), weights,
                               classes_last, reduction, [True]))


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_errors(backend):
    target, logits = inputs("last", 4, (3,))
    nll = fastvae.categorical_nll
    with pytest.raises(TypeError, match="target must hold class indices"):
        nll(target.double(), logits)
    with pytest.raises(TypeError, match="target must hold class indices"):
        nll(target.bool(), logits)
    with pytest.raises(TypeError, match="logits must have a floating dtype"):
        nll(target, target)
    with pytest.raises(ValueError, match=r"logits must be \[B, \*event, K\]"):
        nll(target[:, :2], logits)
    with pytest.raises(ValueError, match=r"logits must be \[B, K, \*event\]"):
        nll(target, logits, class_dim=1)
    with pytest.raises(ValueError, match="at least one class"):
        nll(target, logits[..., :0])
    with pytest.raises(ValueError, match="class_dim must be -1"):
        nll(target, logits, class_dim=2)
    with pytest.raises(ValueError, match="reduction must be one of"):
        nll(target, logits, reduction="avg")
    with pytest.raises(ValueError, match="0-dim"):
        nll(target[0, 0], logits[0, 0])


def test_bad_elbo_input_errors(backend):
    target, logits = inputs("last", 4, (3,))
    mu, logvar = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="class_dim belongs to likelihood 'categorical'"):
        fastvae.elbo_loss(logits[..., 0], logits[..., 0], mu, logvar, class_dim=-1)
    with pytest.raises(ValueError, match="sigma does not belong to likelihood 'categorical'"):
        fastvae.elbo_loss(target, logits, mu, logvar, likelihood="categorical", sigma=0.5)
    with pytest.raises(ValueError, match="mu must be"):
        fastvae.elbo_loss(target, logits, mu[:2], logvar[:2], likelihood="categorical")
    with pytest.raises(TypeError, match="target must hold class indices"):
        fastvae.elbo_loss(target.float(), logits, mu, logvar, likelihood="categorical")
    with pytest.raises(ValueError, match="only elbo_loss and iwae_loss take likelihood"):
        fastvae.ELBOLoss(likelihood="categorical")


def test_value_checks(backend):
    target, logits = inputs("second", 5, (2, 3), samples=2)
    mu, logvar = torch.zeros(3, 2), torch.zeros(3, 2)
    bad = target.clone()
    bad[1, 0, 2] = 7
    with fastvae.validate_values():
        with pytest.raises(ValueError, match=r"target must be a class index in \[0, 5\), got 7 "
                                             r"at index \(1, 0, 2\)"):
            fastvae.categorical_nll(bad, logits, class_dim=1)
        with pytest.raises(ValueError, match="target must be a class index"):
            fastvae.elbo_loss(bad, logits, mu, logvar, likelihood="categorical", class_dim=1)
        with pytest.raises(ValueError, match="logits must be finite"):
            fastvae.categorical_nll(target, logits.detach().index_fill(2, torch.tensor([1]),
                                                                       float("inf")), class_dim=1)
        with pytest.raises(ValueError, match="mu must be finite"):
            fastvae.elbo_loss(target, logits, mu.log(), logvar, likelihood="categorical",
                              class_dim=1)
        checked = fastvae.categorical_nll(target, logits, class_dim=1)
    torch.testing.assert_close(checked, fastvae.categorical_nll(target, logits, class_dim=1))
