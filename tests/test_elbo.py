"""elbo_loss and ELBOLoss against the torch.distributions oracle, on every backend."""
import math

import pytest
import torch

import fastvae
import oracle
from cases import CASE_BY_NAME, CASES, TEST_DEVICE, build, cast, differentiable, generator, pick

REDUCTIONS = ["mean", "sum", "none"]


def values_and_grads(fn, args, kwargs, upstream):
    out = fn(*args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    inputs = [t for _, t in differentiable(args, kwargs)]
    grads = torch.autograd.grad(loss, inputs, upstream)
    return out, grads


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_distributions_float64(backend, case, reduction):
    g = generator(7)
    args, kwargs = build(case, generator=g)
    shape = (args[0].shape[0],) if reduction == "none" else ()
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    terms, grads = values_and_grads(fastvae.elbo_loss, args,
                                    {**kwargs, "reduction": reduction, "return_terms": True}, upstream)
    expected, expected_grads = values_and_grads(oracle.elbo_loss, args, {**kwargs, "reduction": reduction},
                                                upstream)
    assert terms.loss.dtype == torch.float64
    for got, want in zip(terms, expected):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    assert not terms.nll.requires_grad and not terms.kl.requires_grad
    for (name, _), got, want in zip(differentiable(args, kwargs), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", pick("logvar_event", "samples_full", "bernoulli", "prior_shared",
                                      "free_bits", "beta_tensor", "sigma_tensor",
                                      "laplace_logscale_datapoint", "laplace_scale_tensor",
                                      "latent_conv"), ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, case, reduction):
    args, kwargs = build(case, generator=generator(11))
    names = [name for name, _ in differentiable(args, kwargs)]
    tensors = [t for _, t in differentiable(args, kwargs)]
    if case.free_bits:  # keep every dim away from the kink at the free-bits threshold
        kwargs = {**kwargs, "free_bits": 0.02}

    def loss(*inputs):
        bound = dict(zip(names, inputs))
        positional = [bound.get(n, a) for n, a in zip(("x", "x_hat", "mu", "logvar"), args)]
        keywords = {k: bound.get(k, v) for k, v in kwargs.items()}
        return fastvae.elbo_loss(*positional, **keywords, reduction=reduction)

    assert torch.autograd.gradcheck(loss, tensors, fast_mode=True)


def test_free_bits_cases_clamp_some_dims():
    """Every free-bits case has a clamped and an active latent dim, none within 1e-3 of λ (so
    the cases can tell the KL term from the KL, and gradcheck does not sit on the kink)."""
    for case in (c for c in CASES if c.free_bits):
        args, kwargs = build(case, generator=generator(7))
        means = oracle.kl_elements(args[2], args[3], kwargs.get("prior_mu"),
                                   kwargs.get("prior_logvar")).flatten(start_dim=1).mean(0)
        assert (means < case.free_bits).any() and (means > case.free_bits).any(), case.name
        assert ((means - case.free_bits).abs() > 1e-3).all(), case.name


def test_module_matches_functional(backend):
    args, kwargs = build(CASE_BY_NAME["logvar_event"], generator=generator(2))
    criterion = fastvae.ELBOLoss(beta=0.5, free_bits=0.1, reduction="sum")
    got = criterion(*args, x_logvar=kwargs["x_logvar"])
    want = fastvae.elbo_loss(*args, x_logvar=kwargs["x_logvar"], beta=0.5, free_bits=0.1,
                             reduction="sum")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert "reduction='sum'" in repr(criterion)


def test_free_bits_clamps_inactive_dims(backend):
    """A dim whose batch-mean KL is below λ contributes λ to every datapoint, with no gradient."""
    mu = torch.zeros(4, 2, dtype=torch.float64)
    mu[:, 1] = 3.0
    mu.requires_grad_()
    logvar = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(4, 1, dtype=torch.float64)
    terms = fastvae.elbo_loss(x, x.clone(), mu, logvar, free_bits=1.0, reduction="none",
                              return_terms=True)
    nll = 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))
    torch.testing.assert_close(terms.loss, torch.full((4,), nll + 1.0 + 4.5, dtype=torch.float64))
    torch.testing.assert_close(terms.kl, torch.full((4,), 4.5, dtype=torch.float64))
    terms.loss.sum().backward()
    assert torch.equal(mu.grad[:, 0], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(mu.grad[:, 1], torch.full((4,), 3.0, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# free bits at the boundary: a dim whose batch-mean KL equals λ exactly is active
# ----------------------------------------------------------------------------------------------
# With logvar = prior_logvar = 0 the KL of an element is ½(μ − p)², exact in any float dtype for
# these values. Over B = 4 rows: dim 0 has KL (½, ½, 2, 0), mean ¾ = λ exactly: active;
# dim 1 (½, ½, ½, ½), mean ½ < λ: clamped; dim 2 (2, 2, 0, 0), mean 1 > λ: active.
BOUNDARY_FREE_BITS = 0.75
BOUNDARY_DIFF = [[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
def test_free_bits_boundary_dim_is_active(backend, prior, dtype):
    diff = torch.tensor(BOUNDARY_DIFF, dtype=dtype)
    shift = torch.tensor([1.0, -1.0, 0.5], dtype=dtype) if prior else torch.zeros(3, dtype=dtype)
    mu = (diff + shift).requires_grad_()
    priors = {}
    if prior is not None:
        prior_mu = shift.clone() if prior == "shared" else shift.expand(4, 3).clone()
        priors = {"prior_mu": prior_mu.requires_grad_(),
                  "prior_logvar": torch.zeros_like(prior_mu).requires_grad_()}
    logvar = torch.zeros(4, 3, dtype=dtype, requires_grad=True)
    beta = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(4, 2, dtype=dtype)
    x_hat = torch.zeros(4, 2, dtype=dtype, requires_grad=True)
    terms = fastvae.elbo_loss(x, x_hat, mu, logvar, beta=beta, free_bits=BOUNDARY_FREE_BITS,
                              reduction="sum", return_terms=True, **priors)
    leaves = [mu, logvar, beta, *priors.values()]
    grads = torch.autograd.grad(terms.loss, leaves)
    kl = 0.5 * diff.double() ** 2
    kl_term = kl[:, 0] + BOUNDARY_FREE_BITS + kl[:, 2]
    nll = 2 * 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(terms.loss.double(), (nll + 0.5 * kl_term).sum().reshape(()))
    want_mu = 0.5 * diff.double() * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(grads[0].double(), want_mu, rtol=1e-6, atol=1e-7,
                               msg=lambda m: f"the dim at the boundary must be active: {m}")
    torch.testing.assert_close(grads[2].double(), kl_term.sum().reshape(()), rtol=1e-7, atol=0)
    if prior is not None:
        torch.testing.assert_close(grads[3].double().reshape(-1, 3).sum(0), -want_mu.sum(0))
    want = oracle.elbo_loss(x, x_hat, mu, logvar, beta=beta, free_bits=BOUNDARY_FREE_BITS,
                            reduction="sum", **priors)[0]
    for got, expected in zip(grads, torch.autograd.grad(want, leaves)):
        torch.testing.assert_close(got.double(), expected.double())


def test_beta_tensor_change_no_rebuild(backend):
    args, kwargs = build(CASE_BY_NAME["unit_sigma"], generator=generator(5))
    beta = torch.tensor(0.0, dtype=torch.float64)
    nll_only = fastvae.elbo_loss(*args, beta=beta)
    beta.fill_(2.0)
    terms = fastvae.elbo_loss(*args, beta=beta, return_terms=True)
    torch.testing.assert_close(terms.loss, nll_only + 2.0 * terms.kl)


# ----------------------------------------------------------------------------------------------
# precision: float32 / bfloat16 / float16 and mixed dtypes
# ----------------------------------------------------------------------------------------------
def _max_error(got, want):
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", pick("logvar_full", "samples_event", "bernoulli", "prior_shared",
                                      "free_bits", "laplace_logscale_full"), ids=str)
def test_low_precision_no_worse_than_pytorch(backend, case, dtype):
    """Error against float64 no worse than twice PyTorch's own error in the same dtype."""
    args64, kwargs64 = build(case, generator=generator(9))
    args, kwargs = cast(args64, kwargs64, dtype)
    reduction = "none"
    upstream = torch.randn(args64[0].shape[0], generator=generator(4), dtype=torch.float64)
    want, want_grads = values_and_grads(oracle.elbo_loss, args64, {**kwargs64, "reduction": reduction}, upstream)
    torch_out, torch_grads = values_and_grads(oracle.elbo_loss, args, {**kwargs, "reduction": reduction},
                                              upstream.to(dtype))
    got, got_grads = values_and_grads(fastvae.elbo_loss, args, {**kwargs, "reduction": reduction},
                                      upstream.float())
    assert got.dtype == torch.float32
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    loss_scale = max(want[0].abs().max().item(), 1.0)
    assert _max_error(got, want[0]) <= 2 * _max_error(torch_out[0], want[0]) + floor * loss_scale
    for (name, t), g, g_torch, g_want in zip(differentiable(args, kwargs), got_grads, torch_grads, want_grads):
        assert g.dtype == t.dtype, name
        scale = g_want.abs().max().item() if g_want.numel() else 0.0
        assert _max_error(g, g_want) <= 2 * _max_error(g_torch, g_want) + floor * max(scale, 1.0), name


def test_mixed_dtypes_bf16_decoder_fp32_target(backend):
    case = CASE_BY_NAME["logvar_full"]
    args, kwargs = build(case, generator=generator(8), dtype=torch.float32)
    x_hat = args[1].detach().bfloat16().requires_grad_()
    loss = fastvae.elbo_loss(args[0], x_hat, *args[2:], **kwargs)
    want = oracle.elbo_loss(args[0].double(), x_hat.double(), *(a.double() for a in args[2:]),
                            **{k: v.double() for k, v in kwargs.items() if isinstance(v, torch.Tensor)},
                            likelihood="gaussian")[0]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-4)
    loss.backward()
    assert x_hat.grad.dtype == torch.bfloat16 and args[0].grad.dtype == torch.float32
    assert kwargs["x_logvar"].grad.dtype == torch.float32


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_half_precision_log_scale_does_not_overflow(backend, likelihood):
    """Decoder log-scales down to -12 (e^12 ≈ 1.6e5 > float16's largest value; the sums of
    r²·e^−θ overflow float16): the loss and gradients stay accurate, not only finite —
    within float16 rounding of the inputs of the float64 oracle on the same values."""
    g = generator(12)
    x = torch.randn(8, 64, generator=g, device=TEST_DEVICE).half()
    noise = 0.01 * torch.randn(8, 64, generator=g, device=TEST_DEVICE)
    x_hat = (x + noise).half().requires_grad_()
    theta = torch.full((8, 64), -12.0).half().requires_grad_()
    mu = torch.randn(8, 4, generator=g, device=TEST_DEVICE).half().requires_grad_()
    logvar = torch.randn(8, 4, generator=g, device=TEST_DEVICE).half().requires_grad_()
    keyword = {"gaussian": "x_logvar", "laplace": "x_logscale"}[likelihood]
    leaves = (x_hat, theta, mu, logvar)
    loss = fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood=likelihood, **{keyword: theta})
    grads = torch.autograd.grad(loss, leaves)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    want = oracle.elbo_loss(x.double(), exact[0], exact[2], exact[3], likelihood=likelihood,
                            **{keyword: exact[1]})[0]
    want_grads = torch.autograd.grad(want, exact)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-3, atol=0)
    for name, got, expected in zip(("x_hat", "theta", "mu", "logvar"), grads, want_grads):
        assert got.dtype == torch.float16 and got.isfinite().all(), name
        torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=1e-3,
                                   msg=lambda m: f"grad {name}: {m}")


# ----------------------------------------------------------------------------------------------
# conv latents [B, 4, 8, 8]: gaussian_kl, reparameterize and elbo_loss agree on the latent dims
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prior", [None, "channel", "datapoint"])
def test_conv_latents_agree_with_distributions(backend, prior):
    g = generator(21)
    shape = (3, 4, 8, 8)
    mu = torch.randn(shape, generator=g, dtype=torch.float64, device=TEST_DEVICE).requires_grad_()
    logvar = (0.5 * torch.randn(shape, generator=g, dtype=torch.float64,
                                device=TEST_DEVICE)).requires_grad_()
    priors = {}
    if prior is not None:
        prior_shape = (4, 1, 1) if prior == "channel" else shape
        priors = {name: (0.5 * torch.randn(prior_shape, generator=g, dtype=torch.float64,
                                           device=TEST_DEVICE)).requires_grad_()
                  for name in ("prior_mu", "prior_logvar")}
    want = oracle.kl_rows(mu, logvar, *priors.values())
    kl = fastvae.gaussian_kl(mu, logvar, **priors)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, want, rtol=1e-10, atol=1e-10)

    z = fastvae.reparameterize(mu, logvar, 2, seed=5)
    assert z.shape == (2,) + shape
    x = torch.randn(3, 10, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    x_hat = z.flatten(2)[..., :10]  # a "decoder" of z: [S, B, 10]
    terms = fastvae.elbo_loss(x, x_hat, mu, logvar, reduction="none", return_terms=True, **priors)
    torch.testing.assert_close(terms.kl, want.detach(), rtol=1e-10, atol=1e-10)
    upstream = torch.randn(3, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    leaves = [mu, logvar, *priors.values()]
    got = torch.autograd.grad(terms.loss, leaves, upstream, retain_graph=True)
    expected = oracle.elbo_loss(x, x_hat, mu, logvar, reduction="none", **priors)[0]
    for name, a, b in zip(("mu", "logvar", "prior_mu", "prior_logvar"), got,
                          torch.autograd.grad(expected, leaves, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")
