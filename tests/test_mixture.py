"""The mixture-of-Gaussians prior on every backend: mixture_kl against torch.distributions'
MixtureSameFamily (values and the gradients of every input), gradcheck, low precision, edge
cases, a VampPrior whose gradients reach the pseudo-inputs and the encoder, determinism,
torch.compile, opcheck of the op pair (and of the native ops) and bad arguments."""
import pytest
import torch
from torch import distributions as dist
from torch import nn

import fastvae
from cases import TEST_DEVICE, generator
from conftest import cpu_only, intra_op_threads
from fastvae.backends import reference

NAMES = ("z", "mu", "logvar", "means", "logvars", "logits")


def mixture_inputs(samples=3, components=10, latent=(4,), batch=4, dtype=torch.float64, seed=0):
    """(z, mu, logvar, means, logvars, logits), each requiring grad; z is drawn from q, and
    [B, *latent] when samples is None."""
    g = generator(seed)

    def draw(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(shape, generator=g, dtype=torch.float64,
                                           device=TEST_DEVICE)

    mu = draw(batch, *latent)
    logvar = draw(batch, *latent, scale=0.3, shift=-0.5)
    noise = draw(*((samples,) if samples else ()), batch, *latent)
    z = mu + torch.exp(0.5 * logvar) * noise
    prior = (draw(components, *latent), draw(components, *latent, scale=0.3),
             draw(components, scale=0.5))
    return tuple(t.to(dtype).requires_grad_() for t in (z, mu, logvar, *prior))


def fused_kl(z, mu, logvar, means, logvars, logits):
    return fastvae.mixture_kl(z, mu, logvar, fastvae.GaussianMixture(means, logvars, logits))


def oracle_kl(z, mu, logvar, means, logvars, logits):
    """The Monte Carlo KL with torch.distributions: log q(z|x) − log p(z), averaged over z's
    samples."""
    event = mu.dim() - 1
    samples = z if z.dim() > mu.dim() else z.unsqueeze(0)
    q = dist.Independent(dist.Normal(mu, torch.exp(0.5 * logvar)), event)
    components = dist.Independent(dist.Normal(means, torch.exp(0.5 * logvars)), event)
    prior = dist.MixtureSameFamily(dist.Categorical(logits=logits), components,
                                   validate_args=False)
    return (q.log_prob(samples) - prior.log_prob(samples)).mean(0)


def values_and_grads(fn, inputs, upstream):
    kl = fn(*inputs)
    return kl, torch.autograd.grad(kl, inputs, upstream)


def _upstream(batch, dtype=torch.float64):
    return torch.randn(batch, generator=generator(3), dtype=torch.float64,
                       device=TEST_DEVICE).to(dtype)


@pytest.mark.parametrize("latent", [(4,), (2, 3, 2)], ids=["flat", "conv"])
@pytest.mark.parametrize("components", [1, 2, 10, 500])
@pytest.mark.parametrize("samples", [None, 3], ids=["single", "samples3"])
def test_matches_distributions_float64(backend, samples, components, latent):
    inputs = mixture_inputs(samples, components, latent)
    upstream = _upstream(inputs[1].shape[0])
    got, got_grads = values_and_grads(fused_kl, inputs, upstream)
    want, want_grads = values_and_grads(oracle_kl, inputs, upstream)
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for name, g, w in zip(NAMES, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_large_mixture(backend):
    """VampPrior sizes: K = 1000 components of d = 256, one sample of two datapoints."""
    inputs = mixture_inputs(None, 1000, (256,), batch=2, seed=1)
    upstream = _upstream(2)
    got, got_grads = values_and_grads(fused_kl, inputs, upstream)
    want, want_grads = values_and_grads(oracle_kl, inputs, upstream)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
    for name, g, w in zip(NAMES, got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("samples, components, latent", [(None, 3, (3,)), (2, 4, (2, 1, 2))])
def test_gradcheck(backend, samples, components, latent):
    inputs = mixture_inputs(samples, components, latent, batch=3, seed=2)
    assert torch.autograd.gradcheck(fused_kl, inputs, fast_mode=True)


def _max_error(got, want):
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("components", [3, 40])
def test_low_precision_no_worse_than_pytorch(backend, dtype, components):
    """Error against float64 no worse than twice PyTorch's own error in the same dtype."""
    inputs64 = mixture_inputs(2, components, (6,), batch=5, seed=4)
    inputs = tuple(t.detach().to(dtype).requires_grad_() for t in inputs64)
    upstream = _upstream(5)
    want, want_grads = values_and_grads(oracle_kl, inputs64, upstream)
    mine, torch_grads = values_and_grads(oracle_kl, inputs, upstream.to(dtype))
    got, got_grads = values_and_grads(fused_kl, inputs, upstream.float())
    assert got.dtype == torch.float32
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    scale = max(want.abs().max().item(), 1.0)
    assert _max_error(got, want) <= 2 * _max_error(mine, want) + floor * scale
    for name, t, g, g_torch, g_want in zip(NAMES, inputs, got_grads, torch_grads, want_grads):
        assert g.dtype == t.dtype, name
        scale = max(g_want.abs().max().item(), 1.0)
        assert _max_error(g, g_want) <= 2 * _max_error(g_torch, g_want) + floor * scale, name


def test_empty_batch(backend):
    inputs = mixture_inputs(2, 5, (3,), batch=0)
    got, got_grads = values_and_grads(fused_kl, inputs, _upstream(0))
    assert got.shape == (0,)
    for name, t, g in zip(NAMES, inputs, got_grads):
        assert g.shape == t.shape and not g.any(), name


def test_non_contiguous_inputs(backend):
    inputs = mixture_inputs(3, 6, (2, 3), seed=5)
    strided = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
               for t in inputs[:5]]
    strided.append(inputs[5].detach().repeat_interleave(2)[::2].requires_grad_())
    assert not any(t.is_contiguous() for t in strided)
    upstream = _upstream(4)
    got, got_grads = values_and_grads(fused_kl, strided, upstream)
    want, want_grads = values_and_grads(fused_kl, inputs, upstream)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@cpu_only
def test_native_bitwise_equal_across_thread_counts(backend):
    """600 rows: the component gradients' partial sums span chunks split between threads."""
    if backend != "native":
        pytest.skip("the native CPU kernels' threading")
    inputs = [t.detach() for t in mixture_inputs(2, 40, (24,), batch=300, dtype=torch.float32)]
    grad = _upstream(600, torch.float32).view(2, 300)
    results = []
    for threads in (1, 2):
        with intra_op_threads(threads):
            ratio, log_prior_sum = torch.ops.fastvae_native.mixture_log_ratio(*inputs)
            results.append((ratio, *torch.ops.fastvae_native.mixture_log_ratio_backward(
                grad, *inputs, log_prior_sum, [True] * 6)))
    for index, (one, two) in enumerate(zip(*results)):
        assert torch.equal(one, two), f"output {index} differs between 1 and 2 threads"


def test_bitwise_repeatable(backend):
    inputs = mixture_inputs(3, 37, (5,), batch=9, dtype=torch.float32, seed=6)
    upstream = _upstream(9, torch.float32)
    first = values_and_grads(fused_kl, inputs, upstream)
    second = values_and_grads(fused_kl, inputs, upstream)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# a VampPrior: the components are the encoder's outputs on learned pseudo-inputs
# ----------------------------------------------------------------------------------------------
class _VampEncoder(nn.Module):
    def __init__(self, data=6, latent=3, hidden=8, pseudo_inputs=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(data, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.pseudo_inputs = nn.Parameter(torch.rand(pseudo_inputs, data))

    def forward(self, x):
        return self.net(x).chunk(2, -1)


def _vamp_kl(kl, encoder, x, eps):
    mu, logvar = encoder(x)
    z = mu + torch.exp(0.5 * logvar) * eps
    means, logvars = encoder(encoder.pseudo_inputs)
    logits = torch.zeros(means.shape[0], dtype=means.dtype, device=means.device)
    return kl(z, mu, logvar, means, logvars, logits).mean()


def test_vamp_prior_gradients_reach_pseudo_inputs_and_encoder(backend):
    torch.manual_seed(7)
    encoder = _VampEncoder().double().to(TEST_DEVICE)
    g = generator(7)
    x = torch.rand(4, 6, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    eps = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    parameters = list(encoder.parameters())
    got = _vamp_kl(fused_kl, encoder, x, eps)
    want = _vamp_kl(oracle_kl, encoder, x, eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    got_grads = torch.autograd.grad(got, parameters)
    want_grads = torch.autograd.grad(want, parameters)
    for (name, _), g_, w in zip(encoder.named_parameters(), got_grads, want_grads):
        assert g_.abs().max() > 0, name
        torch.testing.assert_close(g_, w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ----------------------------------------------------------------------------------------------
def test_compiled_matches_eager(backend):
    """fullgraph=True over the VampPrior KL: the same value and parameter gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(8)
    encoder = _VampEncoder().double().to(TEST_DEVICE)
    g = generator(8)
    x = torch.rand(4, 6, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64, device=TEST_DEVICE)

    def loss_and_grads(fn):
        loss = fn(fused_kl, encoder, x, eps)
        return (loss, *torch.autograd.grad(loss, list(encoder.parameters())))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = loss_and_grads(torch.compile(_vamp_kl, backend=counter, fullgraph=True))
    for got, want in zip(compiled, loss_and_grads(_vamp_kl)):
        torch.testing.assert_close(got, want)
    assert counter.frame_count == 1


def _op_inputs(dtype, requires_grad=True, samples=2, batch=3, latent=4, components=5):
    """The op's normalised inputs: z [S, B, d], mu, logvar [B, d], means, logvars [K, d],
    logits [K]."""
    g = generator(9)
    shapes = ((samples, batch, latent), (batch, latent), (batch, latent), (components, latent),
              (components, latent), (components,))
    return [torch.randn(shape, generator=g, dtype=torch.float64, device=TEST_DEVICE)
            .to(dtype).requires_grad_(requires_grad) for shape in shapes]


def _backward_args(dtype, needs):
    inputs = _op_inputs(dtype, requires_grad=False)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, log_prior_sum = reference.mixture_log_ratio(*inputs)
    grad = torch.randn(log_prior_sum.shape, generator=generator(10), dtype=acc, device=TEST_DEVICE)
    return (grad, *inputs, log_prior_sum, needs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    torch.library.opcheck(torch.ops.fastvae.mixture_log_ratio.default,
                          (*_op_inputs(dtype), backend))
    for needs in ([True] * 6, [True, False, False, True, False, True], [False] * 6):
        torch.library.opcheck(torch.ops.fastvae.mixture_log_ratio_backward.default,
                              (*_backward_args(dtype, needs), backend))


def test_opcheck_native_ops(backend):
    """The native extension's own ops (fake impls in fastvae.backends.native)."""
    if backend != "native":
        pytest.skip("only the native backend registers ops of its own")
    native = torch.ops.fastvae_native
    for dtype, requires_grad in ((torch.float64, False), (torch.float16, False),
                                 (torch.float64, True)):  # the last: its C++ autograd
        torch.library.opcheck(native.mixture_log_ratio.default,
                              _op_inputs(dtype, requires_grad=requires_grad))
        torch.library.opcheck(native.mixture_log_ratio_backward.default,
                              _backward_args(dtype, [True, True, False, False, True, True]))


# ----------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, error, match", [
    ("no_components", ValueError, "K >= 1"),
    ("logvars_shape", ValueError, r"logvars must be \[K, \*latent\]"),
    ("latent_size", ValueError, r"means must be \[K, \*latent\]"),
    ("not_a_mixture", TypeError, "GaussianMixture"),
])
def test_bad_arguments_raise(backend, bad, error, match):
    z, mu, logvar, means, logvars, logits = (t.detach() for t in mixture_inputs(2, 3, (4,)))
    prior = {"no_components": fastvae.GaussianMixture(means[:0], logvars[:0], logits[:0]),
             "logvars_shape": fastvae.GaussianMixture(means, logvars[:, :3], logits),
             "latent_size": fastvae.GaussianMixture(means[:, :3], logvars[:, :3], logits),
             "not_a_mixture": (means, logvars, logits)}[bad]
    with pytest.raises(error, match=match):
        fastvae.mixture_kl(z, mu, logvar, prior)


@pytest.mark.parametrize("change, match", [
    (dict(means=(5, 3)), r"means must be \[5, 4\]"),
    (dict(logits=(4,)), r"logits must be \[5\]"),
    (dict(logvar=(2, 4)), r"logvar must be \[3, 4\]"),
    (dict(means=(0, 4), logvars=(0, 4), logits=(0,)), "K >= 1"),
])
def test_native_checks_name_the_argument(backend, change, match):
    if backend != "native":
        pytest.skip("the native ops' own checks")
    inputs = dict(zip(NAMES, _op_inputs(torch.float32, requires_grad=False)))
    for name, shape in change.items():
        inputs[name] = torch.zeros(shape, device=TEST_DEVICE)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastvae_native.mixture_log_ratio(*inputs.values())


def test_native_checks_dtype(backend):
    if backend != "native":
        pytest.skip("the native ops' own checks")
    inputs = _op_inputs(torch.float32, requires_grad=False)
    inputs[4] = inputs[4].double()
    with pytest.raises(RuntimeError, match="logvars must have z's dtype"):
        torch.ops.fastvae_native.mixture_log_ratio(*inputs)
