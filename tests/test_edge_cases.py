"""Empty batches, non-contiguous inputs, grad mode and the memory rule."""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae
from cases import TEST_DEVICE, build, differentiable, generator, pick
from fastvae import backends


def test_empty_batch(backend):
    x = torch.empty(0, 3, 4)
    x_hat = torch.empty(2, 0, 3, 4, requires_grad=True)
    mu = torch.empty(0, 5, requires_grad=True)
    logvar = torch.empty(0, 5, requires_grad=True)
    x_logvar = torch.zeros(3, 4, requires_grad=True)
    beta = torch.tensor(0.5, requires_grad=True)
    for reduction, shape in (("none", (0,)), ("sum", ()), ("mean", ())):
        loss = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, reduction=reduction,
                                 free_bits=0.1, beta=beta)
        assert loss.shape == shape
        if reduction == "sum":
            assert loss.item() == 0.0
        loss.sum().backward()
    assert x_hat.grad.shape == x_hat.shape and mu.grad.shape == mu.shape
    assert torch.equal(x_logvar.grad, torch.zeros(3, 4))
    assert beta.grad.item() == 0.0  # (the mean's is not NaN: no row contributes)
    assert fastvae.gaussian_kl(mu, logvar).shape == (0,)
    assert fastvae.gaussian_nll(x, x_hat).shape == (0,)
    assert fastvae.bernoulli_nll(x, x_hat[0]).shape == (0,)
    assert fastvae.laplace_nll(x, x_hat, scale=2.0).shape == (0,)
    assert fastvae.reparameterize(mu, logvar, 3).shape == (3, 0, 5)


@pytest.mark.parametrize("prior_logvar", [None, "shared"])
def test_empty_batch_with_a_prior_per_datapoint(backend, prior_logvar):
    """A prior with B = 0 rows, alone or beside one shared by the batch."""
    mu = torch.empty(0, 5, requires_grad=True)
    prior_mu = torch.empty(0, 5, requires_grad=True)
    shared = torch.zeros(5, requires_grad=True) if prior_logvar else None
    x = torch.empty(0, 3)
    for reduction, shape in (("none", (0,)), ("sum", ()), ("mean", ())):
        loss = fastvae.elbo_loss(x, x.clone(), mu, mu.detach(), prior_mu=prior_mu,
                                 prior_logvar=shared, reduction=reduction)
        assert loss.shape == shape
        loss.sum().backward()
    assert prior_mu.grad.shape == (0, 5)
    if shared is not None:
        assert torch.equal(shared.grad, torch.zeros(5))
    kl = fastvae.gaussian_kl(mu, mu.detach(), prior_mu, shared)
    assert kl.shape == (0,)


def test_empty_event_and_latent(backend):
    mu = torch.randn(4, 3, requires_grad=True)
    x = torch.empty(4, 0)
    loss = fastvae.elbo_loss(x, x.clone(), mu, mu.detach().clone(), reduction="none")
    torch.testing.assert_close(loss, fastvae.gaussian_kl(mu, mu.detach()))


def test_non_contiguous_inputs(backend):
    case, = pick("samples_datapoint")
    args, kwargs = build(case, dtype=torch.float32, generator=generator(1))
    # the same values laid out transposed / strided in memory
    x_hat = args[1].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    mu = torch.zeros(5, 6)[:, ::2].copy_(args[2].detach()).requires_grad_()
    x_logvar = kwargs["x_logvar"].detach().permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0).requires_grad_()
    assert not (x_hat.is_contiguous() or mu.is_contiguous() or x_logvar.is_contiguous())
    strided = fastvae.elbo_loss(args[0], x_hat, mu, args[3], x_logvar=x_logvar)
    dense = fastvae.elbo_loss(*args, **kwargs)
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)
    strided.backward()
    dense.backward()
    for a, b in ((x_hat, args[1]), (mu, args[2]), (x_logvar, kwargs["x_logvar"])):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_repeatable_bitwise(backend):
    case, = pick("free_bits_prior")
    results = []
    for _ in range(2):
        args, kwargs = build(case, dtype=torch.float32, generator=generator(6))
        loss = fastvae.elbo_loss(*args, **kwargs)
        loss.backward()
        results.append([loss] + [t.grad for _, t in differentiable(args, kwargs)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# grad mode and the memory rule (docs/design.md)
# ----------------------------------------------------------------------------------------------
class SavedTensors:
    """Records every tensor autograd saves while active."""

    def __init__(self):
        self.saved = []

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, tensor):
        self.saved.append(tensor)
        return tensor

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _NativeElboCalls(TorchDispatchMode):
    """Sees every call of the native elbo op, those made by its C++ autograd included."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastvae_native.elbo.default:
            self.calls.append(list(args[-1]))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def spy_needs_grad(monkeypatch, backend):
    """Record the ``needs_grad`` flags each call of the backend's elbo receives: through the
    backend module, or for ops that record their own autograd (native: backward runs in C++)
    through a dispatch mode."""
    calls, module = [], backends.module(backend)
    if module.RECORDS_AUTOGRAD:
        with _NativeElboCalls(calls):
            yield calls
        return
    original = module.elbo

    def spy(*args):
        calls.append(list(args[-1]))
        return original(*args)

    monkeypatch.setattr(module, "elbo", spy)
    yield calls


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_memory_rule_loss(backend, reduction, monkeypatch):
    batch, event, latent = 6, 40, 3
    x = torch.randn(batch, event)
    x_hat = torch.randn(2, batch, event, requires_grad=True)
    x_logvar = torch.randn(2, batch, event, requires_grad=True)
    mu = torch.randn(batch, latent, requires_grad=True)
    logvar = torch.randn(batch, latent, requires_grad=True)
    with SavedTensors() as record:
        loss = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, free_bits=0.1,
                                 reduction=reduction)
    gradient_shapes = {t.shape for t in (x_hat, x_logvar, mu, logvar)}
    for tensor in record.saved:
        assert tensor.numel() <= batch or tensor.shape in gradient_shapes, tensor.shape
    saved_bytes = sum(t.numel() * t.element_size() for t in record.saved)
    input_bytes = sum(t.numel() * t.element_size() for t in (x_hat, x_logvar, mu, logvar))
    assert saved_bytes <= input_bytes + 4 * batch * 8 + 64
    loss.sum().backward()


def test_memory_rule_sampling(backend):
    mu = torch.randn(64, 8, requires_grad=True)
    logvar = torch.randn(64, 8, requires_grad=True)
    with SavedTensors() as record:
        z = fastvae.reparameterize(mu, logvar, 4)
    assert z.numel() == 4 * mu.numel()
    assert all(t.numel() <= mu.numel() for t in record.saved)
    assert any(t is logvar or t.data_ptr() == logvar.data_ptr() for t in record.saved)


def test_no_gradients_computed_without_grad(backend, monkeypatch):
    x = torch.randn(3, 4)
    x_hat, mu, logvar = (torch.randn(3, 4, requires_grad=True), torch.randn(3, 2, requires_grad=True),
                         torch.randn(3, 2, requires_grad=True))
    with spy_needs_grad(monkeypatch, backend) as calls:
        with torch.no_grad(), SavedTensors() as record:
            fastvae.elbo_loss(x, x_hat, mu, logvar)
        fastvae.elbo_loss(x, x_hat.detach(), mu.detach(), logvar.detach())
        fastvae.elbo_loss(x, x_hat, mu.detach(), logvar.detach())
    assert record.saved == []
    assert calls == [[False] * 7, [False] * 7, [False, True] + [False] * 5]


def test_shared_inputs_with_reduction_none_recompute_in_backward(backend, monkeypatch):
    """An input shared by all datapoints cannot get its gradient in forward under 'none': then
    forward forms no gradient at all and backward recomputes every one it needs."""
    x = torch.randn(3, 4, dtype=torch.float64)
    x_hat = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    x_logvar = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mu, logvar = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with spy_needs_grad(monkeypatch, backend) as calls:
        loss = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, reduction="none")
        loss.backward(torch.arange(3.0, dtype=torch.float64))
    assert calls[0][:3] == [False, False, False] and calls[1][:3] == [False, True, True]
    want = sum(w * torch.autograd.grad(fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar,
                                                         reduction="none")[i], x_logvar)[0]
               for i, w in enumerate(range(3)))
    torch.testing.assert_close(x_logvar.grad, want)


def test_a_float_beta_is_one_cached_tensor_and_the_cache_is_bounded(backend):
    """A float β is filled once per (value, dtype, device), not per call, and an annealed β
    (a new value every step) never holds more than 256 tensors."""
    from fastvae import functional
    device = torch.device(TEST_DEVICE)
    first = functional._beta_tensor(0.37, device, torch.float32)
    assert functional._beta_tensor(0.37, device, torch.float32) is first
    assert first.item() == pytest.approx(0.37) and first.dim() == 0
    for step in range(600):
        functional._beta_tensor(step / 600, device, torch.float32)
        assert len(functional._constants) <= 256


def test_one_dim_data_is_one_value_per_datapoint(backend):
    """x of shape [B] (no event dims) is valid: each datapoint's NLL is its one element's."""
    x, mean = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = fastvae.gaussian_nll(x, mean)
    want = -torch.distributions.Normal(mean, 1.0).log_prob(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("wider", ["mu", "logvar", "prior_mu", "prior_logvar"])
def test_any_latent_in_float64_makes_the_kl_float64(backend, wider):
    """The latents are promoted together: one float64 latent gives a float64 KL, as accurate
    as an all-float64 one."""
    g = generator(8)
    latents = {name: torch.randn(4, 3, generator=g, dtype=torch.float64)
               for name in ("mu", "logvar", "prior_mu", "prior_logvar")}
    given = {name: t if name == wider else t.float() for name, t in latents.items()}
    got = fastvae.gaussian_kl(**given)
    exact = {name: t.double() for name, t in given.items()}
    want = torch.distributions.kl_divergence(
        torch.distributions.Normal(exact["mu"], torch.exp(0.5 * exact["logvar"])),
        torch.distributions.Normal(exact["prior_mu"], torch.exp(0.5 * exact["prior_logvar"]))).sum(-1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("wide", [None, "x", "x_hat", "x_logvar", "mu", "beta"])
def test_beta_reaches_the_backend_in_the_loss_dtype(backend, monkeypatch, wide):
    """The backend contract: beta is a 0-dim tensor in the loss dtype (float64 when any of x,
    x_hat, θ and the latents is float64, else float32), whatever the caller's beta is."""
    module = backends.module(backend)
    seen = []

    def spy(function):
        def recorded(*args):
            seen.append(args[7])
            return function(*args)
        return recorded

    # (the native backend's elbo_loss is the same op returning its loss alone)
    for name in ("elbo", "elbo_loss"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, spy(getattr(module, name)))
    g = generator(4)
    args = {name: torch.randn(shape, generator=g).to(torch.float64 if name == wide else torch.float32)
            for name, shape in (("x", (3, 4)), ("x_hat", (3, 4)), ("x_logvar", (4,)),
                                ("mu", (3, 2)), ("logvar", (3, 2)))}
    for beta in (0.5, torch.tensor(0.5, dtype=torch.float64 if wide == "beta" else torch.float16)):
        fastvae.elbo_loss(args["x"], args["x_hat"], args["mu"], args["logvar"],
                          x_logvar=args["x_logvar"], beta=beta)
        want = torch.float64 if wide not in (None, "beta") else torch.float32
        assert seen[-1].dtype == want and seen[-1].dim() == 0 and seen[-1].item() == 0.5


@pytest.mark.parametrize("leaf", ["x_hat", "mu", "logvar", "prior_mu", "prior_logvar"])
def test_a_gradient_for_any_one_input_alone(backend, leaf):
    """Whichever single input requires grad, the loss has a gradient for it."""
    g = generator(9)
    args = {name: torch.randn(shape, generator=g, dtype=torch.float64)
            for name, shape in (("x", (3, 4)), ("x_hat", (3, 4)), ("mu", (3, 2)),
                                ("logvar", (3, 2)), ("prior_mu", (2,)), ("prior_logvar", (2,)))}
    args[leaf].requires_grad_()
    loss = fastvae.elbo_loss(args["x"], args["x_hat"], args["mu"], args["logvar"],
                             prior_mu=args["prior_mu"], prior_logvar=args["prior_logvar"])
    (grad,) = torch.autograd.grad(loss, args[leaf])
    assert grad.shape == args[leaf].shape and bool(grad.abs().sum() > 0)


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(backend):
    """No jvp is implemented: a dual input must give an error, never a result whose tangent is
    silently missing."""
    g = generator(8)
    x = torch.rand(3, 4, generator=g, device=TEST_DEVICE)
    x_hat, mu, logvar = (torch.randn(shape, generator=g, device=TEST_DEVICE)
                         for shape in ((3, 4), (3, 2), (3, 2)))
    with fwAD.dual_level():
        dual_x_hat = fwAD.make_dual(x_hat, torch.ones_like(x_hat))
        dual_mu = fwAD.make_dual(mu, torch.ones_like(mu))
        for call in (lambda: fastvae.elbo_loss(x, dual_x_hat, mu, logvar, likelihood="bernoulli"),
                     lambda: fastvae.elbo_loss(x, x_hat, dual_mu, logvar),
                     lambda: fastvae.reparameterize(dual_mu, logvar, seed=1)):
            with pytest.raises((RuntimeError, NotImplementedError), match="(?i)jvp|forward"):
                call()
