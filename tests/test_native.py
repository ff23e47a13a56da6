"""What only the native backend needs checked: results independent of the thread count (to the
bit), the C++ noise stream against the Python one, the raw ops under opcheck, and float64
gradcheck through the public API."""
import pytest
import torch

import fastvae
from fastvae import _philox

native = pytest.importorskip("fastvae._native", reason="fastvae._C not built")
ops = torch.ops.fastvae_native

ALL_GRADS = [True] * 7


def _threads(count, function):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return function()
    finally:
        torch.set_num_threads(previous)


def _elbo_args(batch, latent, features, samples, logvar_shape, prior_rows, free_bits,
               bernoulli=False, reduction="mean", grad_scale=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = torch.rand(batch, features, generator=g).to(dtype) if bernoulli else randn(batch, features)
    x_hat = randn(samples, batch, features)
    x_logvar = None if logvar_shape is None else randn(*logvar_shape, scale=0.5)
    mu, logvar = randn(batch, latent), randn(batch, latent, scale=0.5)
    priors = (None, None) if prior_rows is None else \
        (randn(prior_rows, latent, scale=0.5), randn(prior_rows, latent, scale=0.5))
    scale = torch.rand(batch, generator=g) if grad_scale else None
    needs = [True, True, x_logvar is not None, True, True, prior_rows is not None,
             prior_rows is not None]
    return (x, x_hat, x_logvar, -0.3, mu, logvar, *priors, torch.tensor(0.8), free_bits,
            bernoulli, reduction, scale, needs)


THREAD_CASES = {
    # x_logvar shared by the batch ([Sl, 1, D]), one prior for all rows, free bits
    "per-feature logvar, shared prior, free bits": dict(
        logvar_shape=(1, 1, 3000), prior_rows=1, free_bits=0.45, samples=2),
    "per-sample logvar, shared prior": dict(
        logvar_shape=(2, 1, 3000), prior_rows=1, free_bits=0.0, samples=2),
    "scalar logvar per sample": dict(logvar_shape=(2, 1, 1), prior_rows=None, free_bits=0.2,
                                     samples=2),
    "bernoulli, weighted rows": dict(logvar_shape=None, prior_rows=2048, free_bits=0.3,
                                     samples=1, bernoulli=True, reduction="none",
                                     grad_scale=True),
    "bfloat16 inputs": dict(logvar_shape=(1, 1, 3000), prior_rows=1, free_bits=0.45, samples=1,
                            dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(THREAD_CASES), ids=list(THREAD_CASES))
def test_elbo_bitwise_equal_across_thread_counts(case):
    args = _elbo_args(2048, 64, 3000, **THREAD_CASES[case])
    one = _threads(1, lambda: ops.elbo(*args))
    two = _threads(2, lambda: ops.elbo(*args))
    for index, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"output {index} differs between 1 and 2 threads"


def test_reparameterize_bitwise_equal_across_thread_counts():
    g = torch.Generator().manual_seed(3)
    mu, logvar = torch.randn(2048 * 64, generator=g), torch.randn(2048 * 64, generator=g)
    seed = torch.tensor(987654321987, dtype=torch.int64)
    grad_z = torch.randn(3 * mu.numel(), generator=g)
    for function in (lambda: (ops.reparameterize(mu, logvar, seed, 3),),
                     lambda: ops.reparameterize_backward(grad_z, logvar, seed, 3, True, True)):
        one, two = _threads(1, function), _threads(2, function)
        assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("numel", [1, 2, 3, 5, 4097, 100_003])
@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 - 1])
def test_noise_stream_matches_python(numel, seed):
    seed = torch.tensor(seed, dtype=torch.int64)
    expected = _philox.normal_stream(seed, numel)
    # with mu = 0 and logvar = 0, z is the noise itself
    eps = ops.reparameterize(torch.zeros(numel), torch.zeros(numel), seed, 1)
    torch.testing.assert_close(eps, expected, atol=1e-6, rtol=1e-6)


def test_noise_stream_over_samples_matches_python():
    seed = torch.tensor(2**40 + 17, dtype=torch.int64)
    latent, samples = 37, 5  # 185 normals: the quarters cross sample boundaries
    expected = _philox.normal_stream(seed, latent * samples)
    eps = ops.reparameterize(torch.zeros(latent), torch.zeros(latent), seed, samples)
    torch.testing.assert_close(eps, expected, atol=1e-6, rtol=1e-6)


OPCHECK_CASES = {
    "gaussian full logvar": dict(logvar_shape=(2, 3, 5), prior_rows=None, free_bits=0.0, samples=2),
    "broadcast logvar and prior": dict(logvar_shape=(1, 1, 5), prior_rows=1, free_bits=0.1,
                                       samples=2, reduction="sum"),
    "constant logvar": dict(logvar_shape=None, prior_rows=3, free_bits=0.0, samples=1,
                            reduction="none", grad_scale=True),
    "bernoulli": dict(logvar_shape=None, prior_rows=None, free_bits=0.0, samples=1,
                      bernoulli=True),
    "float64": dict(logvar_shape=(2, 3, 1), prior_rows=None, free_bits=0.0, samples=2,
                    dtype=torch.float64),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=list(OPCHECK_CASES))
def test_opcheck_elbo(case):
    torch.library.opcheck(ops.elbo.default, _elbo_args(3, 4, 5, **OPCHECK_CASES[case]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_reparameterize(dtype):
    mu, logvar = torch.randn(10, dtype=dtype), torch.randn(10, dtype=dtype)
    seed = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(ops.reparameterize.default, (mu, logvar, seed, 3))
    torch.library.opcheck(ops.reparameterize_backward.default,
                          (torch.randn(30, dtype=dtype), logvar, seed, 3, True, False))


def _leaf(*shape, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).requires_grad_()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("logvar_shape", [(4, 6), (6,), (2, 4, 6), ()])
def test_gradcheck_elbo_loss(reduction, logvar_shape):
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    inputs = (x.requires_grad_(), _leaf(2, 4, 6), _leaf(4, 3), _leaf(4, 3, scale=0.5),
              _leaf(*logvar_shape, scale=0.5), _leaf(3, scale=0.5), _leaf(3, scale=0.5))

    def loss(x, x_hat, mu, logvar, x_logvar, prior_mu, prior_logvar):
        return fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar, prior_mu=prior_mu,
                                 prior_logvar=prior_logvar, beta=0.7, reduction=reduction)

    with fastvae.use_backend("native"):
        assert torch.autograd.gradcheck(loss, inputs)


def test_gradcheck_bernoulli_with_free_bits():
    torch.manual_seed(1)
    x = torch.rand(5, 7, dtype=torch.float64).requires_grad_()
    mu = torch.cat([_leaf(5, 2, scale=3.0).detach(), _leaf(5, 2, scale=0.01).detach()], 1)

    def loss(x, logits, mu, logvar):
        return fastvae.elbo_loss(x, logits, mu, logvar, likelihood="bernoulli", free_bits=0.5)

    with fastvae.use_backend("native"):
        assert torch.autograd.gradcheck(loss, (x, _leaf(5, 7), mu.requires_grad_(),
                                               _leaf(5, 4, scale=0.1)))


def test_gradcheck_reparameterize():
    def sample(mu, logvar):
        return fastvae.reparameterize(mu, logvar, 3, seed=12345)

    with fastvae.use_backend("native"):
        assert torch.autograd.gradcheck(sample, (_leaf(4, 5), _leaf(4, 5, scale=0.5)))


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("need_mu,need_logvar", [(True, True), (True, False), (False, True),
                                                 (False, False)])
def test_reparameterize_backward_matches_reference(samples, need_mu, need_logvar):
    from fastvae import reference
    g = torch.Generator().manual_seed(11)
    logvar = torch.randn(1000, generator=g, dtype=torch.float64)
    grad_z = torch.randn(samples * 1000, generator=g, dtype=torch.float64)
    seed = torch.tensor(2**50 + 3, dtype=torch.int64)
    got = ops.reparameterize_backward(grad_z, logvar, seed, samples, need_mu, need_logvar)
    want = reference.reparameterize_backward(grad_z, logvar, seed, samples, need_mu, need_logvar)
    for a, b, needed in zip(got, want, (need_mu, need_logvar)):
        if needed:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        else:
            assert a.numel() == 0


@pytest.mark.parametrize("features", [2049, 2048])  # rows misaligned / aligned for vector stores
def test_large_outputs_match_reference(features):
    """Outputs past the non-temporal-store threshold (8 MB) take the streaming path."""
    from fastvae import reference
    args = _elbo_args(1100, 8, features, logvar_shape=(1, 1100, features), prior_rows=None,
                      free_bits=0.0, samples=1, reduction="sum")
    assert args[1].nbytes >= 8 << 20
    got = ops.elbo(*args)
    loss, nll, kl, kl_term, grads = reference.elbo(*args)
    for a, b in zip(got, (loss, nll, kl, kl_term) + tuple(grads)):
        if b.numel():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
