"""fastvae under torch.compile: a whole training step with fullgraph=True equals eager, the
backend is a guarded trace-time constant, and a tensor beta never recompiles. On the test
device (``FASTVAE_TEST_DEVICE``), every backend under test.

Inductor compiles are slow on small machines: only ``test_compiled_training_step_matches_eager``
uses inductor, once per backend."""
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import fastvae
from cases import TEST_DEVICE
from fastvae import backends
from models import EveryFunctionVAE, batch, train


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_training_step_matches_eager(backend, compiler):
    """fullgraph=True over a step using every public function; same values and gradients as
    eager for three SGD steps; a new tensor beta each step compiles nothing new."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager_model = EveryFunctionVAE()
    compiled_model = copy.deepcopy(eager_model)
    counter = CompileCounterWithBackend(compiler)
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x, x_binary = batch()
    betas = [torch.tensor(b) for b in (0.5, 0.8, 1.0)]

    want = train(eager_model, eager_model, x, x_binary, betas)
    got = train(compiled_model, compiled, x, x_binary, betas)
    tolerance = {} if compiler == "aot_eager" else {"rtol": 1e-4, "atol": 1e-5}
    for step, ((outputs, grads), (want_outputs, want_grads)) in enumerate(zip(got, want)):
        for name, a, b in zip(("loss", "nll", "kl"), outputs, want_outputs):
            torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"step {step} {name}: {m}")
        assert grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], **tolerance,
                                       msg=lambda m: f"step {step} grad {name}: {m}")
    assert counter.frame_count == 1, "changing a tensor beta must not recompile"


def test_switching_backend_recompiles(backend, monkeypatch):
    """The backend is resolved at trace time (a constant in the graph) and the selection is
    guarded, so compiled code never keeps running a backend that is no longer selected."""
    others = [name for name in fastvae.available_backends(TEST_DEVICE) if name != backend]
    if not others:
        pytest.skip(f"needs a second backend for {TEST_DEVICE.type} tensors")
    other = others[0]
    module = backends.module(other)
    calls, original = [], module.elbo
    monkeypatch.setattr(module, "elbo", lambda *a: calls.append(1) or original(*a))
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x, mu = torch.randn(3, 4), torch.randn(3, 2)
    fn = torch.compile(lambda x, mu: fastvae.elbo_loss(x, x * 0.5, mu, mu), backend=counter,
                       fullgraph=True)
    want = fn(x, mu)
    assert not calls
    with fastvae.use_backend(other):
        got = fn(x, mu)
    assert calls and counter.frame_count == 2
    torch.testing.assert_close(got, want)


def test_first_compiled_call_in_a_fresh_process_compiles_once(backend, monkeypatch):
    """A user who never calls set_backend: FASTVAE_BACKEND (or 'auto') picks the backend."""
    monkeypatch.setattr(backends, "_selected", backend)  # `import fastvae` with FASTVAE_BACKEND set
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    x, mu = torch.randn(3, 4), torch.randn(3, 2)
    fn = torch.compile(lambda x, mu, beta: fastvae.elbo_loss(x, x * 0.5, mu, mu, beta=beta),
                       backend=counter, fullgraph=True)
    for beta in (0.5, 0.7, 0.9):
        fn(x, mu, torch.tensor(beta))
    assert counter.frame_count == 1


def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    x = torch.randn(4, 6)
    x_hat = torch.randn(4, 6, requires_grad=True)
    mu, logvar = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2, requires_grad=True)
    beta = torch.tensor(0.5)

    def step(x, x_hat, mu, logvar, beta):
        z = fastvae.reparameterize(mu, logvar, seed=3)
        return (fastvae.elbo_loss(x, x_hat + z.sum(), mu, logvar, beta=beta)
                + fastvae.elbo_loss(x, x_hat, mu, logvar, likelihood="laplace", scale=0.5))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(x, x_hat, mu, logvar, beta)
    want = step(x, x_hat, mu, logvar, beta)
    torch.testing.assert_close(got, want)
    upstream = torch.rand(())
    grads = torch.autograd.grad(got, (x_hat, mu, logvar), upstream)
    want_grads = torch.autograd.grad(want, (x_hat, mu, logvar), upstream)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
