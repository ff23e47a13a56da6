"""reparameterize: the noise stream, its statistics, values and gradients, on every backend."""
import pytest
import torch
from scipy import stats

import fastvae
from cases import generator
from fastvae import _philox


def expected_z(mu, logvar, seed, n_samples):
    """z from the noise stream (docs/design.md), in float64."""
    count = (n_samples or 1) * mu.numel()
    eps = _philox.normal_stream(torch.tensor(seed), count).double().view(n_samples or 1, *mu.shape)
    z = mu.double() + torch.exp(0.5 * logvar.double()) * eps
    return z if n_samples else z[0]


@pytest.mark.parametrize("n_samples", [None, 1, 3])
@pytest.mark.parametrize("shape", [(7,), (5, 3), (2, 3, 5), (0, 4)])
def test_values_follow_the_stream(backend, shape, n_samples):
    mu, logvar = torch.randn(shape), torch.randn(shape)
    z = fastvae.reparameterize(mu, logvar, n_samples, seed=2024)
    assert z.shape == ((n_samples,) if n_samples else ()) + shape and z.dtype == torch.float32
    torch.testing.assert_close(z.double(), expected_z(mu, logvar, 2024, n_samples), rtol=1e-5, atol=1e-5)


def test_stream_matches_triton_definition():
    """``tl.randn4x(42, offset)`` for offsets 0 and 1, printed by Triton 3.9's interpreter,
    in stream order (quarter-major): pins the stream every backend is compared with."""
    stream = _philox.normal_stream(torch.tensor(42), 8)
    pinned = torch.tensor([0.66061336, -1.5427135, -0.27522656, -2.2434545,
                           -0.81531668, 0.19943771, -1.7824750, -0.12898643])
    torch.testing.assert_close(stream, pinned, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**63 - 1])
def test_large_and_edge_seeds(backend, seed):
    mu, logvar = torch.zeros(9), torch.zeros(9)
    z = fastvae.reparameterize(mu, logvar, seed=seed)
    torch.testing.assert_close(z.double(), expected_z(mu, logvar, seed, None), rtol=1e-5, atol=1e-5)


def test_seed_tensor_and_determinism(backend):
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    a = fastvae.reparameterize(mu, logvar, 2, seed=99)
    b = fastvae.reparameterize(mu, logvar, 2, seed=torch.tensor(99))
    assert torch.equal(a, b)
    assert not torch.equal(a, fastvae.reparameterize(mu, logvar, 2, seed=100))


def test_manual_seed_and_generator_govern_the_noise(backend):
    mu, logvar = torch.randn(3, 8), torch.randn(3, 8)
    torch.manual_seed(5)
    a = fastvae.reparameterize(mu, logvar)
    torch.manual_seed(5)
    b = fastvae.reparameterize(mu, logvar)
    c = fastvae.reparameterize(mu, logvar)
    assert torch.equal(a, b) and not torch.equal(b, c)
    g1, g2 = generator(8), generator(8)
    assert torch.equal(fastvae.reparameterize(mu, logvar, generator=g1),
                       fastvae.reparameterize(mu, logvar, generator=g2))


def test_noise_is_standard_normal(backend):
    n = 200_003
    eps = fastvae.reparameterize(torch.zeros(n), torch.zeros(n), seed=31337).double()
    assert abs(eps.mean().item()) < 5 / n**0.5
    assert abs(eps.var().item() - 1.0) < 5 * (2 / n) ** 0.5
    assert stats.kstest(eps.cpu().numpy(), "norm").pvalue > 1e-3
    # the four quarters are separate Philox outputs: no correlation between them
    quarter = n // 4
    first, second = eps[:quarter], eps[quarter:2 * quarter]
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1].item()) < 5 / quarter**0.5


@pytest.mark.parametrize("n_samples", [None, 4])
def test_gradients_with_random_upstream(backend, n_samples):
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    z = fastvae.reparameterize(mu, logvar, n_samples, seed=77)
    upstream = torch.randn_like(z)
    got = torch.autograd.grad(z, (mu, logvar), upstream)
    want = torch.autograd.grad(expected_z(mu, logvar, 77, n_samples), (mu, logvar), upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_gradcheck(backend):
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m, v: fastvae.reparameterize(m, v, 3, seed=5), (mu, logvar),
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    mu = torch.randn(6, 5).to(dtype).requires_grad_()
    logvar = torch.randn(6, 5).to(dtype).requires_grad_()
    z = fastvae.reparameterize(mu, logvar, 2, seed=3)
    assert z.dtype == dtype
    want = expected_z(mu.detach(), logvar.detach(), 3, 2)
    tolerance = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(z.double(), want, rtol=tolerance, atol=tolerance)
    z.sum().backward()
    assert mu.grad.dtype == dtype and logvar.grad.dtype == dtype


def test_mixed_dtypes_promote(backend):
    mu = torch.randn(4, 2).bfloat16().requires_grad_()
    logvar = torch.randn(4, 2, requires_grad=True)
    z = fastvae.reparameterize(mu, logvar, seed=1)
    assert z.dtype == torch.float32
    z.sum().backward()
    assert mu.grad.dtype == torch.bfloat16 and logvar.grad.dtype == torch.float32


def test_non_contiguous_inputs(backend):
    base_mu, base_lv = torch.randn(6, 8), torch.randn(6, 8)
    mu, logvar = base_mu.t(), base_lv[:, ::2]
    mu, logvar = mu[:4, :4], logvar[:4, :4]
    assert not mu.is_contiguous()
    z = fastvae.reparameterize(mu, logvar, 2, seed=12)
    want = fastvae.reparameterize(mu.contiguous(), logvar.contiguous(), 2, seed=12)
    assert torch.equal(z, want)


# From mutation testing: only one of mu, logvar needing a gradient; the wider dtype in either
# argument; the seed drawn when none is given.
@pytest.mark.parametrize("wants", ["mu", "logvar"])
def test_gradient_when_only_one_input_requires_it(backend, wants):
    mu = torch.randn(5, 3, dtype=torch.float64, requires_grad=wants == "mu")
    logvar = torch.randn(5, 3, dtype=torch.float64, requires_grad=wants == "logvar")
    leaf = mu if wants == "mu" else logvar
    z = fastvae.reparameterize(mu, logvar, 2, seed=77)
    upstream = torch.randn_like(z)
    (got,) = torch.autograd.grad(z, leaf, upstream)
    (want,) = torch.autograd.grad(expected_z(mu, logvar, 77, 2), leaf, upstream)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("wider", ["mu", "logvar"])
def test_mixed_dtypes_promote_whichever_is_wider(backend, wider):
    narrow, wide = torch.randn(4, 2), torch.randn(4, 2, dtype=torch.float64)
    mu, logvar = (wide, narrow) if wider == "mu" else (narrow, wide)
    z = fastvae.reparameterize(mu, logvar, seed=3)
    assert z.dtype == torch.float64
    torch.testing.assert_close(z, expected_z(mu, logvar, 3, None), rtol=1e-6, atol=1e-6)


def test_unseeded_calls_draw_distinct_streams(backend):
    """Without a seed each call draws one from the full int64 range: 64 calls give 64 different
    samples (a narrow range of drawn seeds would repeat within a few dozen steps)."""
    mu, logvar = torch.zeros(1, 4), torch.zeros(1, 4)
    samples = {tuple(fastvae.reparameterize(mu, logvar).flatten().tolist()) for _ in range(64)}
    assert len(samples) == 64
