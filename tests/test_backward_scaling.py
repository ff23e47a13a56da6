"""The loss's backward scales the gradients formed in forward by the upstream gradient (in
place on the first backward, skipping the pass when it is 1). Whatever the order and number of
backward passes, every gradient equals the oracle's for the upstream gradients given: on every
backend, in float64, against torch.distributions differentiated by autograd."""
import pytest
import torch

import fastvae
import oracle
from cases import TEST_DEVICE, build, differentiable, generator, pick

CASES = pick("logvar_full", "prior_shared", "laplace_logscale_event", "samples_datapoint",
             "x_beta_grad_fb0.6_prior_datapoint_laplace", "x_beta_grad_fb0_prior_shared_laplace")


def _setup(case, reduction, seed=3):
    args, kwargs = build(case, generator=generator(seed))
    kwargs = {**kwargs, "reduction": reduction}
    leaves = [t for _, t in differentiable(args, kwargs)]
    return args, kwargs, leaves


def _oracle_grads(args, kwargs, leaves, upstream):
    loss = oracle.elbo_loss(*args, **kwargs)[0]
    return torch.autograd.grad(loss, leaves, upstream)


def _scalar(value):
    return torch.tensor(value, dtype=torch.float64, device=TEST_DEVICE)


def _rows(seed, batch):
    return torch.rand(batch, generator=generator(seed), dtype=torch.float64, device=TEST_DEVICE) * 2 - 0.5


def _assert_grads(got, want, names, what):
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"{what}, {name}: {m}")


def _names(args, kwargs):
    return [name for name, _ in differentiable(args, kwargs)]


def test_plain_backward(backend):
    for case in CASES:
        args, kwargs, leaves = _setup(case, "mean")
        fastvae.elbo_loss(*args, **kwargs).backward()
        want = _oracle_grads(args, kwargs, leaves, _scalar(1.0))
        _assert_grads([t.grad for t in leaves], want, _names(args, kwargs), case.name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("first, second", [(1.0, 3.0), (2.0, 2.0), (0.5, 1.0), (3.0, 1.0), (-1.0, 0.25)])
def test_backward_twice_through_a_retained_graph(backend, reduction, first, second):
    """Gradients accumulated into the leaves over two backward passes of one forward."""
    for case in CASES:
        args, kwargs, leaves = _setup(case, reduction)
        loss = fastvae.elbo_loss(*args, **kwargs)
        loss.backward(_scalar(first), retain_graph=True)
        loss.backward(_scalar(second))
        want = _oracle_grads(args, kwargs, leaves, _scalar(first + second))
        _assert_grads([t.grad for t in leaves], want, _names(args, kwargs), case.name)


@pytest.mark.parametrize("first, second", [(1.0, 3.0), (2.0, 2.0), (0.5, 1.0)])
def test_autograd_grad_results_stay_what_they_were(backend, first, second):
    """``torch.autograd.grad`` twice through a retained graph: each call returns the gradients
    for its own upstream gradient, and the tensors the first call returned do not change when
    the second runs. If the caller then writes to the returned tensors, a third call raises or
    is still right."""
    for case in CASES:
        args, kwargs, leaves = _setup(case, "mean")
        names = _names(args, kwargs)
        unit = _oracle_grads(args, kwargs, leaves, _scalar(1.0))
        loss = fastvae.elbo_loss(*args, **kwargs)
        got_first = torch.autograd.grad(loss, leaves, _scalar(first), retain_graph=True)
        kept = [g.clone() for g in got_first]
        got_second = torch.autograd.grad(loss, leaves, _scalar(second), retain_graph=True)
        _assert_grads(got_first, [first * w for w in unit], names, f"{case.name}, first call")
        _assert_grads(got_first, kept, names, f"{case.name}, first call's tensors changed")
        _assert_grads(got_second, [second * w for w in unit], names, f"{case.name}, second call")
        for g in got_first + got_second:
            g.mul_(100.0)
        try:
            got_third = torch.autograd.grad(loss, leaves, _scalar(second))
        except RuntimeError:
            continue  # refused: the saved gradients were changed in place
        _assert_grads(got_third, [second * w for w in unit], names, f"{case.name}, third call")


def test_per_row_weights_then_backward_again(backend):
    """reduction='none': random per-row upstream weights, then a second backward through the
    retained graph with other weights; the leaves hold the sum."""
    for case in CASES:
        args, kwargs, leaves = _setup(case, "none")
        batch = args[0].shape[0]
        first, second = _rows(1, batch), _rows(2, batch)
        loss = fastvae.elbo_loss(*args, **kwargs)
        loss.backward(first, retain_graph=True)
        loss.backward(second)
        want = _oracle_grads(args, kwargs, leaves, first + second)
        _assert_grads([t.grad for t in leaves], want, _names(args, kwargs), case.name)


def test_per_row_weights_with_autograd_grad(backend):
    for case in CASES:
        args, kwargs, leaves = _setup(case, "none")
        batch = args[0].shape[0]
        weights = _rows(3, batch)
        got = torch.autograd.grad(fastvae.elbo_loss(*args, **kwargs), leaves, weights)
        _assert_grads(got, _oracle_grads(args, kwargs, leaves, weights), _names(args, kwargs),
                      case.name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_accumulate_over_two_iterations(backend, reduction):
    """Two forward/backward iterations (as with gradient accumulation over micro-batches) add
    up in the leaves; the second forward uses another beta."""
    for case in CASES:
        args, kwargs, leaves = _setup(case, reduction)
        batch = args[0].shape[0]
        upstreams = [_rows(4, batch), _rows(5, batch)] if reduction == "none" else \
            [_scalar(1.0), _scalar(0.5)]
        second_kwargs = {**kwargs}
        if not isinstance(kwargs.get("beta"), torch.Tensor):
            second_kwargs["beta"] = 0.3
        for keywords, upstream in zip((kwargs, second_kwargs), upstreams):
            fastvae.elbo_loss(*args, **keywords).backward(upstream)
        want = [a + b for a, b in zip(_oracle_grads(args, kwargs, leaves, upstreams[0]),
                                      _oracle_grads(args, second_kwargs, leaves, upstreams[1]))]
        _assert_grads([t.grad for t in leaves], want, _names(args, kwargs), case.name)


@pytest.mark.parametrize("first", ["zero", "row mask"])
def test_zero_upstream_then_backward_again_is_never_silently_wrong(backend, first):
    """A first backward with upstream gradient 0 (or a 0/1 row mask) scales the gradients to 0
    in place; a second backward through the retained graph must then either give the right
    gradients or raise, never return a wrong number."""
    case, = pick("logvar_full")
    reduction = "mean" if first == "zero" else "none"
    args, kwargs, leaves = _setup(case, reduction)
    batch = args[0].shape[0]
    if first == "zero":
        upstreams = [_scalar(0.0), _scalar(2.0)]
    else:
        mask = (torch.arange(batch, device=TEST_DEVICE) % 2).double()
        upstreams = [mask, _rows(6, batch)]
    loss = fastvae.elbo_loss(*args, **kwargs)
    loss.backward(upstreams[0], retain_graph=True)
    try:
        loss.backward(upstreams[1])
    except RuntimeError as error:
        assert "fastvae" in str(error)
        return
    want = _oracle_grads(args, kwargs, leaves, upstreams[0] + upstreams[1])
    _assert_grads([t.grad for t in leaves], want, _names(args, kwargs), case.name)


def test_upstream_changed_in_place_between_backwards_is_never_silently_wrong(backend):
    case, = pick("logvar_full")
    args, kwargs, leaves = _setup(case, "none")
    batch = args[0].shape[0]
    upstream = _rows(7, batch)
    first = upstream.clone()
    loss = fastvae.elbo_loss(*args, **kwargs)
    loss.backward(upstream, retain_graph=True)
    upstream.mul_(3.0)
    try:
        loss.backward(upstream)
    except RuntimeError as error:
        assert "fastvae" in str(error)
        return
    want = _oracle_grads(args, kwargs, leaves, first + upstream)
    _assert_grads([t.grad for t in leaves], want, _names(args, kwargs), case.name)


@pytest.mark.parametrize("first", ["zero", "changed in place"])
def test_a_refused_second_backward_says_what_to_do(backend, first):
    """Where a second backward through a retained graph cannot be answered (the eager path
    scaled the gradients in place), the error names the cause and the remedy."""
    case, = pick("logvar_full")
    args, kwargs, leaves = _setup(case, "none")
    upstream = _rows(7, args[0].shape[0])
    if first == "zero":
        upstream[0] = 0.0
    loss = fastvae.elbo_loss(*args, **kwargs)
    loss.backward(upstream, retain_graph=True)
    message = {
        "zero": r"^fastvae: backward through a retained graph whose first backward had an "
                r"upstream gradient of 0, which scaled the loss's gradients to 0 in place; run "
                r"the first backward with a nonzero gradient$",
        "changed in place": r"^fastvae: the gradient passed to the first backward through this "
                            r"retained graph was modified in place since; pass a new tensor to "
                            r"backward instead of changing that one$"}[first]
    if first == "changed in place":
        upstream.mul_(3.0)
    with pytest.raises(RuntimeError, match=message):
        loss.backward(upstream)
