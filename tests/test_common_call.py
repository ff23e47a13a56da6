"""The common call of elbo_loss takes a short path (functional._common_loss): a few attribute
reads, then the op, on the native backend through a binding that returns the loss alone. It must
give what the general path gives, bit for bit, and hand every other call to the general path.

The general path is reached with ``return_terms=True`` (whose ``.loss`` is the same op's loss),
so each comparison runs both paths on the same inputs.
"""
import itertools

import pytest
import torch

import fastvae
from fastvae import functional
from cases import LIKELIHOODS, LOG_SCALE_KEYWORD, TEST_DEVICE, UNIT_INTERVAL, generator

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _call(likelihood, dtype, batch=3, strided=False, event=(5,)):
    """(args, kwargs) of a call in the common form, the data ``[batch, *event]``, every tensor
    but x requiring grad; with ``strided``, x_hat and mu laid out transposed in memory."""
    g = generator(0)

    def tensor(*shape, uniform=False, grad=True):
        values = (torch.rand(*shape, generator=g, device=TEST_DEVICE) if uniform
                  else torch.randn(*shape, generator=g, device=TEST_DEVICE))
        return values.to(dtype).requires_grad_(grad)

    x = tensor(batch, *event, uniform=likelihood in UNIT_INTERVAL, grad=False)
    x_hat, mu, logvar = tensor(batch, *event), tensor(batch, 2), tensor(batch, 2)
    if strided:
        x_hat = x_hat.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_()
        mu = mu.detach().t().contiguous().t().requires_grad_()
    # (free bits of 0.6 nats hold some latent dims of these draws, not all)
    kwargs = {"likelihood": likelihood, "beta": 0.7, "free_bits": 0.6}
    if likelihood in LOG_SCALE_KEYWORD:
        kwargs[LOG_SCALE_KEYWORD[likelihood]] = tensor(batch, *event) * 0.3
    return (x, x_hat, mu, logvar), kwargs


def _leaves(args, kwargs):
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]


def _loss_and_grads(loss, leaves, upstream):
    grads = torch.autograd.grad(loss, leaves, upstream) if leaves else ()
    return (loss.detach(), *grads)


@pytest.fixture
def short_path_calls(monkeypatch):
    """A list of the losses the short path (functional._common_loss) returns; where it returns
    None, the general path runs."""
    taken = []
    real = functional._common_loss

    def recorded(*args):
        loss = real(*args)
        if loss is not None:
            taken.append(loss)
        return loss

    monkeypatch.setattr(functional, "_common_loss", recorded)
    return taken


@pytest.mark.parametrize("likelihood,reduction,dtype", list(itertools.product(
    LIKELIHOODS, ("none", "mean", "sum"), DTYPES)))
@pytest.mark.parametrize("batch,strided,event", [(3, False, (5,)), (4, True, (5,)),
                                                (0, False, (5,)), (2, True, (2, 3, 2))])
def test_common_call_equals_the_general_path(backend, short_path_calls, likelihood, reduction,
                                             dtype, batch, strided, event):
    args, kwargs = _call(likelihood, dtype, batch, strided, event=event)
    kwargs["reduction"] = reduction
    leaves = _leaves(args, kwargs)
    common = fastvae.elbo_loss(*args, **kwargs)
    assert len(short_path_calls) == 1
    general = fastvae.elbo_loss(*args, **kwargs, return_terms=True).loss
    assert len(short_path_calls) == 1
    upstream = torch.rand(common.shape, generator=generator(1), device=TEST_DEVICE) + 0.5
    for a, b in zip(_loss_and_grads(common, leaves, upstream),
                    _loss_and_grads(general, leaves, upstream)):
        # (an empty batch's mean is NaN on both paths)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_common_call_with_mixed_dtypes(backend, short_path_calls):
    """Each data tensor in its own dtype, the latents in a third: only the latents must agree."""
    args, kwargs = _call("gaussian", torch.float32)
    x, x_hat, mu, logvar = args
    args = (x, x_hat.detach().double().requires_grad_(), mu.detach().bfloat16().requires_grad_(),
            logvar.detach().bfloat16().requires_grad_())
    kwargs["x_logvar"] = kwargs["x_logvar"].detach().half().requires_grad_()
    leaves = _leaves(args, kwargs)
    common = fastvae.elbo_loss(*args, **kwargs)
    general = fastvae.elbo_loss(*args, **kwargs, return_terms=True).loss
    assert len(short_path_calls) == 1 and common.dtype == torch.float64
    for a, b in zip(_loss_and_grads(common, leaves, None), _loss_and_grads(general, leaves, None)):
        assert torch.equal(a, b)


def test_common_call_without_grad(backend):
    args, kwargs = _call("gaussian", torch.float32)
    with torch.no_grad():
        loss = fastvae.elbo_loss(*args, **kwargs)
    assert not loss.requires_grad
    assert torch.equal(loss, fastvae.elbo_loss(*args, **kwargs, return_terms=True).loss.detach())


def _uncommon_calls():
    """(name, args, kwargs) of calls the short path must leave to the general path: each is
    the common call with one thing changed."""
    args, kwargs = _call("gaussian", torch.float32)
    x, x_hat, mu, logvar = args
    theta = kwargs["x_logvar"]
    changed = {
        "1-D data": ((x[:, 0], x_hat[:, 0], mu, logvar), {"x_logvar": theta[:, 0]}),
        "sample dim": ((x, x_hat[None], mu, logvar), {"x_logvar": theta[None]}),
        "broadcast θ": (args, {"x_logvar": theta[0]}),
        "latent dtypes differ": ((x, x_hat, mu, logvar.double()), {}),
        "a tensor subclass": ((x, torch.nn.Parameter(x_hat.detach()), mu, logvar), {}),
        "sigma": (args, {"x_logvar": None, "sigma": 0.5}),
        "a prior": (args, {"prior_mu": torch.zeros_like(mu)}),
        "capacity": (args, {"capacity": 1.0}),
        "β a tensor": (args, {"beta": torch.tensor(0.5, device=TEST_DEVICE)}),
        "β an int": (args, {"beta": 1}),
        "free bits an int": (args, {"free_bits": 0}),
        "return_terms": (args, {"return_terms": True}),
        "categorical": ((torch.zeros(len(x), dtype=torch.int64, device=TEST_DEVICE), x_hat, mu,
                         logvar), {"likelihood": "categorical", "x_logvar": None}),
    }
    for name, (call_args, extra) in changed.items():
        yield name, call_args, {**kwargs, **extra}


@pytest.mark.parametrize("name,args,kwargs", list(_uncommon_calls()),
                         ids=[name for name, _, _ in _uncommon_calls()])
def test_other_calls_take_the_general_path(backend, short_path_calls, name, args, kwargs):
    loss = fastvae.elbo_loss(*args, **kwargs)
    assert not short_path_calls
    assert torch.isfinite(loss if isinstance(loss, torch.Tensor) else loss.loss)


def test_value_checking_mode_takes_the_general_path(backend):
    args, kwargs = _call("gaussian", torch.float32)
    bad = args[1].detach().clone()
    bad[0, 0] = float("nan")
    with fastvae.validate_values(), pytest.raises(ValueError, match="x_hat must be finite"):
        fastvae.elbo_loss(args[0], bad, *args[2:], **kwargs)


def test_torch_function_modes_see_the_op(backend):
    """The native backend's loss-only binding bypasses torch function handling, so under a mode
    the op is called as usual, and the mode sees it."""
    seen = []

    class Recording(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    args, kwargs = _call("gaussian", torch.float32)
    with Recording():
        loss = fastvae.elbo_loss(*args, **kwargs)
    assert torch.equal(loss, fastvae.elbo_loss(*args, **kwargs))
    if backend == "native":  # (the other backends' ops are torch's own, seen one by one)
        assert "fastvae_native.elbo.default" in seen
