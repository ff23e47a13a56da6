"""Determinism: the same seed gives bitwise the same training step, and (CPU) the result does
not depend on the number of intra-op threads — and equals the reference backend's."""
import torch

import fastvae
from cases import TEST_DEVICE, generator
from conftest import cpu_only, intra_op_threads
from models import SAMPLES, EveryFunctionVAE, batch


def test_training_step_is_bitwise_repeatable(backend):
    """Same seed → bitwise the same loss and gradients (multi-sample, free bits, priors, every
    function), and a different seed gives different noise."""
    x, x_binary = batch()
    runs = []
    for seed in (9, 9, 10):
        torch.manual_seed(0)
        model = EveryFunctionVAE()
        torch.manual_seed(seed)
        outputs = model(x, x_binary, torch.tensor(0.6))
        outputs[0].backward()
        runs.append([o.detach() for o in outputs] + [p.grad for p in model.parameters()])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])


def _threaded_step(base, x, threads):
    with intra_op_threads(threads):
        leaves = [t.clone().requires_grad_() for t in base]
        x_hat, x_logvar, mu, logvar = leaves
        z = fastvae.reparameterize(mu, logvar, SAMPLES, seed=77)
        loss = fastvae.elbo_loss(x, x_hat + z.mean(-1, keepdim=True), mu, logvar,
                                 x_logvar=x_logvar, free_bits=0.4, beta=torch.tensor(0.8),
                                 prior_mu=mu.detach()[0] * 0.5)
        loss.backward()
        return [loss.detach(), z.detach()] + [t.grad for t in leaves]


@cpu_only
def test_bitwise_across_thread_counts(backend):
    """fastvae alone (no Linear layers, whose BLAS need not be thread-invariant): the same
    loss and gradients with 1 and 2 intra-op threads, on inputs big enough to be split, and
    close to the reference backend's (so that both thread counts are not equally wrong)."""
    rows, features, latent = (8, 64, 8) if backend == "triton" else (300, 512, 160)
    g = generator(4)
    base = [torch.randn(SAMPLES, rows, features, generator=g, device=TEST_DEVICE),
            torch.randn(rows, features, generator=g, device=TEST_DEVICE),
            torch.randn(rows, latent, generator=g, device=TEST_DEVICE),
            0.5 * torch.randn(rows, latent, generator=g, device=TEST_DEVICE)]
    x = torch.randn(rows, features, generator=g, device=TEST_DEVICE)
    one, two = (_threaded_step(base, x, threads) for threads in (1, 2))
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"output {i} differs between 1 and 2 threads"
    with fastvae.use_backend("reference"):
        want = _threaded_step(base, x, 1)
    for i, (a, b) in enumerate(zip(one, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"output {i}: {m}")
