"""elbo_loss and ELBOLoss against the torch.distributions oracle, on every backend."""
import pytest
import torch

import fastvae
import oracle
from cases import CASES, build, cast, differentiable, generator

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


@pytest.mark.parametrize("case", [c for c in CASES if c.name in
                                  ("logvar_event", "samples_full", "bernoulli", "prior_shared",
                                   "free_bits", "beta_tensor", "sigma_tensor")], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, case, reduction):
    args, kwargs = build(case, generator=generator(11))
    names = [name for name, _ in differentiable(args, kwargs)]
    tensors = [t for _, t in differentiable(args, kwargs)]
    if case.free_bits:  # keep every dim away from the kink at the free-bits threshold
        kwargs = {**kwargs, "free_bits": 0.05}

    def loss(*inputs):
        bound = dict(zip(names, inputs))
        positional = [bound.get(n, a) for n, a in zip(("x", "x_hat", "mu", "logvar"), args)]
        keywords = {k: bound.get(k, v) for k, v in kwargs.items()}
        return fastvae.elbo_loss(*positional, **keywords, reduction=reduction)

    assert torch.autograd.gradcheck(loss, tensors, fast_mode=True)


def test_module_matches_functional(backend):
    args, kwargs = build(CASES[4], generator=generator(2))
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


def test_beta_tensor_change_no_rebuild(backend):
    args, kwargs = build(CASES[0], generator=generator(5))
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
@pytest.mark.parametrize("case", [c for c in CASES if c.name in
                                  ("logvar_full", "samples_event", "bernoulli", "prior_shared",
                                   "free_bits")], ids=str)
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
    assert _max_error(got, want[0]) <= 2 * _max_error(torch_out[0], want[0]) + floor
    for (name, t), g, g_torch, g_want in zip(differentiable(args, kwargs), got_grads, torch_grads, want_grads):
        assert g.dtype == t.dtype, name
        scale = g_want.abs().max().item() if g_want.numel() else 0.0
        assert _max_error(g, g_want) <= 2 * _max_error(g_torch, g_want) + floor * max(scale, 1.0), name


def test_mixed_dtypes_bf16_decoder_fp32_target(backend):
    case = CASES[7]  # logvar_full
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


def test_half_precision_logvar_does_not_overflow(backend):
    """Decoder log-variances down to -12 (e^12 ≈ 1.6e5 > float16 max for r²·e^−lv sums)."""
    x = torch.randn(8, 64).half()
    x_hat = (x + 0.01 * torch.randn(8, 64)).half().requires_grad_()
    x_logvar = torch.full((8, 64), -12.0).half().requires_grad_()
    mu = torch.randn(8, 4).half().requires_grad_()
    logvar = torch.randn(8, 4).half().requires_grad_()
    loss = fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar)
    loss.backward()
    assert torch.isfinite(loss)
    for t in (x_hat, x_logvar, mu, logvar):
        assert torch.isfinite(t.grad.float()).all()
