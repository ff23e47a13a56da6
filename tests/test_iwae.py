"""The importance-weighted bound on every backend: iwae_loss against the torch.distributions
oracle (values and the gradients of every input), the IWAE and DReG gradients of a small MLP
VAE's encoder and decoder parameters against plain-PyTorch surrogate losses in float64, pythae's
IWAE loss, gradcheck, low precision, edge cases, torch.compile, opcheck and the log p(x)
estimator against a model whose log p(x) is known in closed form."""
import math

import pytest
import torch
from torch import nn

import fastvae
import oracle
from cases import CASE_BY_NAME, TEST_DEVICE, build, cast, generator, pick

REDUCTIONS = ["mean", "sum", "none"]
IWAE_CASES = pick("unit_sigma", "sigma_float", "sigma_tensor", "logvar_scalar", "logvar_event",
                  "logvar_datapoint", "samples_full", "samples_datapoint", "bernoulli_samples",
                  "continuous_bernoulli_samples", "laplace_scale_float", "laplace_samples_full",
                  "laplace_logscale_event", "prior_shared", "prior_datapoint", "prior_mu_only",
                  "batch_one", "latent_conv")


def iwae_inputs(case, dtype=torch.float64, seed=5, samples=3):
    """(positional, keyword) arguments of iwae_loss for an ELBO case: x_hat gets S samples (the
    case's, else ``samples``), z is drawn around mu; free bits and β do not apply."""
    args, kwargs = build(case, dtype=dtype, generator=generator(seed))
    x, x_hat, mu, logvar = args
    if case.samples is None:
        x_hat = x_hat.detach().expand(samples, *x_hat.shape).contiguous().requires_grad_()
        x_hat.data.add_(0.3 * torch.randn(x_hat.shape, generator=generator(seed + 1),
                                          dtype=torch.float64, device=TEST_DEVICE).to(dtype))
        kwargs = {k: (v.detach().expand(samples, *v.shape).clone().requires_grad_()
                      if k.startswith("x_log") and v.shape == x_hat.shape[1:] else v)
                  for k, v in kwargs.items()}
    noise = torch.randn((x_hat.shape[0], *mu.shape), generator=generator(seed + 2),
                        dtype=torch.float64, device=TEST_DEVICE)
    z = (mu.detach().double() + noise).to(mu.dtype).requires_grad_()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("free_bits", "beta")}
    return [x, x_hat, z, mu, logvar], kwargs


def tensors_of(args, kwargs):
    named = list(zip(("x", "x_hat", "z", "mu", "logvar"), args))
    named += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return [(name, t) for name, t in named if t.requires_grad]


def values_and_grads(fn, args, kwargs, upstream):
    loss = fn(*args, **kwargs)
    return loss, torch.autograd.grad(loss, [t for _, t in tensors_of(args, kwargs)], upstream)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", IWAE_CASES, ids=str)
def test_matches_distributions_float64(backend, case, reduction):
    args, kwargs = iwae_inputs(case)
    shape = (args[0].shape[0],) if reduction == "none" else ()
    upstream = torch.randn(shape, generator=generator(3), dtype=torch.float64, device=TEST_DEVICE)
    kwargs = {**kwargs, "reduction": reduction}
    got, got_grads = values_and_grads(fastvae.iwae_loss, args, kwargs, upstream)
    want, want_grads = values_and_grads(oracle.iwae_loss, args, kwargs, upstream)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-10)
    for (name, _), g, w in zip(tensors_of(args, kwargs), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_bound_lies_between_the_elbo_estimate_and_log_px(backend):
    """With S samples the bound is at least the average of the S single-sample estimates
    (Jensen), and it equals that average at S = 1."""
    args, kwargs = iwae_inputs(CASE_BY_NAME["bernoulli_samples"])
    x, x_hat, z, mu, logvar = args
    weights = oracle.log_weights(x, x_hat, z, mu, logvar, likelihood="bernoulli").detach()
    bound = -fastvae.iwae_loss(*args, **kwargs, reduction="none")
    assert (bound >= weights.mean(0) - 1e-12).all() and (bound > weights.mean(0) + 1e-3).any()
    single = -fastvae.iwae_loss(x, x_hat[:1], z[:1], mu, logvar, **kwargs, reduction="none")
    torch.testing.assert_close(single, weights[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the two estimators on a model: encoder and decoder parameter gradients
# ----------------------------------------------------------------------------------------------
class _TinyVAE(nn.Module):
    def __init__(self, data=8, latent=3, hidden=16):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data, hidden), nn.Tanh(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, data))


def _model_and_data(seed=0):
    torch.manual_seed(seed)
    model = _TinyVAE().double().to(TEST_DEVICE)
    x = torch.rand(6, 8, generator=generator(seed), dtype=torch.float64, device=TEST_DEVICE)
    return model, x


def _row_weights(reduction, batch):
    """How the bound's rows are weighed into the scalar that the gradients are taken of: None
    for 'mean' (the loss itself); for 'none' a random [B] tensor, which reaches the bound op as
    its upstream gradient."""
    if reduction == "mean":
        return None
    return torch.randn(batch, generator=generator(12), dtype=torch.float64, device=TEST_DEVICE)


def _weighed(loss, row_weights):
    return loss if row_weights is None else (loss * row_weights).sum()


def _fused_grads(model, x, samples, estimator, likelihood, row_weights=None):
    mu, logvar = model.encoder(x).chunk(2, -1)
    z = fastvae.reparameterize(mu, logvar, n_samples=samples, seed=11)
    tie = None
    decoder_input = z
    if estimator == "dreg":
        decoder_input, tie = fastvae.dreg(z)
    loss = _weighed(fastvae.iwae_loss(
        x, model.decoder(decoder_input), z, mu, logvar, likelihood=likelihood, dreg=tie,
        reduction="mean" if row_weights is None else "none"), row_weights)
    return loss, torch.autograd.grad(loss, list(model.parameters())), z


def _surrogate(log_w, z_fused, mu, logvar, encoder, decoder, estimator, row_weights=None):
    """The bound's value and the estimator's gradients with respect to the parameter lists
    ``encoder`` and ``decoder`` (a learned prior's with the decoder's), from surrogate losses of
    plain PyTorch: IWAE differentiates the bound itself; DReG takes the encoder gradient of
    −Σ_s sg(w̃_s²) log w_s with q's parameters stopped, and the decoder gradient of the bound
    with z stopped (Tucker et al. 2018, eq. 7). ``log_w(z, mu, logvar)`` gives the [S, B] log
    weights; z = mu + σ·ε carries the noise ε of the fused call's sample ``z_fused``. The rows
    are averaged, or weighed by ``row_weights`` (see _row_weights)."""
    eps = ((z_fused - mu) * torch.exp(-0.5 * logvar)).detach()
    z = mu + torch.exp(0.5 * logvar) * eps

    def reduce(rows):
        return rows.mean() if row_weights is None else (rows * row_weights).sum()

    def negative_bound(weights):
        return reduce(-(torch.logsumexp(weights, 0) - math.log(z.shape[0])))

    loss = negative_bound(log_w(z, mu, logvar))
    if estimator == "iwae":
        return loss.detach(), torch.autograd.grad(loss, encoder + decoder)
    weights = log_w(z, mu.detach(), logvar.detach())
    tilde = torch.softmax(weights, 0).detach()
    grads = torch.autograd.grad(reduce(-(tilde ** 2 * weights).sum(0)), encoder)
    stopped = log_w(z.detach(), mu.detach(), logvar.detach())
    return loss.detach(), grads + torch.autograd.grad(negative_bound(stopped), decoder)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_model_gradients_match_surrogate_losses(backend, estimator, likelihood, reduction):
    """With 'none', DReG's tie reaches the op as a log-weight offset of [S, B], whose gradient
    is scaled along its last dim by the [B] upstream."""
    model, x = _model_and_data()
    row_weights = _row_weights(reduction, x.shape[0])
    loss, got, z = _fused_grads(model, x, 5, estimator, likelihood, row_weights)

    def log_w(z, mu, logvar):
        return oracle.log_weights(x, model.decoder(z), z, mu, logvar, likelihood=likelihood)

    want_loss, want = _surrogate(log_w, z, *model.encoder(x).chunk(2, -1),
                                 list(model.encoder.parameters()),
                                 list(model.decoder.parameters()), estimator, row_weights)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    for (name, _), g, w in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_dreg_differs_from_iwae_only_in_the_encoder(backend):
    model, x = _model_and_data(1)
    _, iwae, _ = _fused_grads(model, x, 5, "iwae", "bernoulli")
    _, dreg, _ = _fused_grads(model, x, 5, "dreg", "bernoulli")
    names = [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, iwae, dreg):
        if name.startswith("decoder"):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        else:
            assert (a - b).abs().max() > 1e-6, name


def test_matches_pythae_iwae_loss(backend):
    """pythae's IWAE loss (models/iwae): log w with ½·SSE for the Gaussian decoder, log p(z)
    and log q(z|x) without their log 2π, and the surrogate −Σ_s sg(w̃_s)·log w_s averaged over
    the batch. Its gradient is the IWAE gradient; its log w is ours shifted by the constant
    D/2·log 2π of σ = 1."""
    model, x = _model_and_data(2)
    loss, got, z = _fused_grads(model, x, 5, "iwae", "gaussian")
    mu, logvar = model.encoder(x).chunk(2, -1)
    z = mu + torch.exp(0.5 * logvar) * ((z - mu) * torch.exp(-0.5 * logvar)).detach()
    recon = 0.5 * ((model.decoder(z) - x) ** 2).sum(-1)
    log_q = (-0.5 * (logvar + (z - mu) ** 2 / logvar.exp())).sum(-1)
    log_p = -0.5 * (z ** 2).sum(-1)
    log_w = -(recon + log_q - log_p)
    surrogate = -(torch.softmax(log_w, 0).detach() * log_w).sum(0).mean()
    want = torch.autograd.grad(surrogate, list(model.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    shift = 0.5 * x.shape[1] * math.log(2 * math.pi)
    bound = torch.logsumexp(log_w.detach() - shift, 0) - math.log(5)
    torch.testing.assert_close(loss, -bound.mean(), rtol=1e-12, atol=1e-12)


def test_dreg_tie_must_reach_the_bound(backend):
    model, x = _model_and_data()
    mu, logvar = model.encoder(x).chunk(2, -1)
    z = fastvae.reparameterize(mu, logvar, n_samples=2)
    z_decoder, tie = fastvae.dreg(z)
    loss = fastvae.iwae_loss(x, model.decoder(z_decoder), z, mu, logvar, likelihood="bernoulli")
    with pytest.raises(RuntimeError, match="tie"):
        loss.backward()


# ----------------------------------------------------------------------------------------------
# gradcheck, precision, edge cases
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", pick("samples_full", "bernoulli_samples", "prior_shared",
                                      "laplace_logscale_event", "latent_conv"), ids=str)
def test_gradcheck(backend, case, reduction):
    args, kwargs = iwae_inputs(case, seed=13)
    named = tensors_of(args, kwargs)

    def loss(*inputs):
        bound = dict(zip([name for name, _ in named], inputs))
        positional = [bound.get(n, a) for n, a in zip(("x", "x_hat", "z", "mu", "logvar"), args)]
        keywords = {k: bound.get(k, v) for k, v in kwargs.items()}
        return fastvae.iwae_loss(*positional, **keywords, reduction=reduction)

    assert torch.autograd.gradcheck(loss, [t for _, t in named], fast_mode=True)


def _max_error(got, want):
    return (got.double() - want.double()).abs().max().item() if want.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", pick("samples_full", "bernoulli_samples", "prior_shared",
                                      "laplace_samples_full"), ids=str)
def test_low_precision_no_worse_than_pytorch(backend, case, dtype):
    """Error against float64 no worse than twice PyTorch's own error in the same dtype."""
    args64, kwargs64 = iwae_inputs(case, seed=17)
    args, kwargs = cast(args64, kwargs64, dtype)
    upstream = torch.randn(args64[0].shape[0], generator=generator(4), dtype=torch.float64,
                           device=TEST_DEVICE)
    options = {"reduction": "none"}
    want, want_grads = values_and_grads(oracle.iwae_loss, args64, {**kwargs64, **options}, upstream)
    mine, torch_grads = values_and_grads(oracle.iwae_loss, args, {**kwargs, **options},
                                         upstream.to(dtype))
    got, got_grads = values_and_grads(fastvae.iwae_loss, args, {**kwargs, **options},
                                      upstream.float())
    assert got.dtype == torch.float32
    floor = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    loss_scale = max(want.abs().max().item(), 1.0)
    assert _max_error(got, want) <= 2 * _max_error(mine, want) + floor * loss_scale
    for (name, t), g, g_torch, g_want in zip(tensors_of(args, kwargs), got_grads, torch_grads,
                                             want_grads):
        assert g.dtype == t.dtype, name
        scale = max(g_want.abs().max().item(), 1.0)
        assert _max_error(g, g_want) <= 2 * _max_error(g_torch, g_want) + floor * scale, name


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    x = torch.rand(0, 4, device=TEST_DEVICE)
    x_hat = torch.randn(3, 0, 4, device=TEST_DEVICE, requires_grad=True)
    mu = torch.randn(0, 2, device=TEST_DEVICE, requires_grad=True)
    z = torch.randn(3, 0, 2, device=TEST_DEVICE, requires_grad=True)
    loss = fastvae.iwae_loss(x, x_hat, z, mu, mu, likelihood="bernoulli", reduction=reduction)
    want = oracle.iwae_loss(x, x_hat, z, mu, mu, likelihood="bernoulli", reduction=reduction)
    torch.testing.assert_close(loss, want.detach(), equal_nan=True)
    loss.sum().backward()
    assert x_hat.grad.shape == x_hat.shape and z.grad.shape == z.shape


def test_non_contiguous_inputs(backend):
    args, kwargs = iwae_inputs(CASE_BY_NAME["samples_full"], seed=19)
    strided = [t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
               if t.dim() >= 2 else t for t in args]
    strided[1] = args[1].detach().repeat_interleave(2, -1)[..., ::2].requires_grad_()
    assert not strided[1].is_contiguous()
    torch.testing.assert_close(fastvae.iwae_loss(*strided, **kwargs),
                               fastvae.iwae_loss(*args, **kwargs), rtol=0, atol=0)


def test_bitwise_repeatable(backend):
    args, kwargs = iwae_inputs(CASE_BY_NAME["laplace_samples_full"], dtype=torch.float32)
    first = values_and_grads(fastvae.iwae_loss, args, kwargs, None)
    second = values_and_grads(fastvae.iwae_loss, args, kwargs, None)
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad, match", [
    (dict(x_hat_shape=(2, 4)), r"x_hat must be \[S, B, \*event\]"),
    (dict(z_shape=(2, 2, 2)), r"z must be \[S, \*mu.shape\]"),
    (dict(mu_rows=3), r"mu must be \[B, \*latent\]"),
    (dict(tie_shape=(3, 3)), r"dreg must be the tie"),
    (dict(likelihood="poisson"), "likelihood"),
    (dict(sigma=0.0), "sigma"),
    (dict(likelihood="categorical", sigma=0.5), "sigma does not belong"),
])
def test_bad_arguments_raise(backend, bad, match):
    x = torch.rand(2, 4, device=TEST_DEVICE)
    x_hat = torch.randn(bad.get("x_hat_shape", (3, 2, 4)), device=TEST_DEVICE)
    mu = torch.randn(bad.get("mu_rows", 2), 2, device=TEST_DEVICE)
    z = torch.randn(bad.get("z_shape", (3, *mu.shape)), device=TEST_DEVICE)
    options = {k: bad[k] for k in ("likelihood", "sigma") if k in bad}
    if "tie_shape" in bad:
        options["dreg"] = torch.zeros(bad["tie_shape"], device=TEST_DEVICE, requires_grad=True)
    with pytest.raises((ValueError, TypeError), match=match):
        fastvae.iwae_loss(x, x_hat, z, mu, mu, **options)


# ----------------------------------------------------------------------------------------------
# log p(x)
# ----------------------------------------------------------------------------------------------
def _linear_gaussian(seed=0, data=5, latent=2, noise=0.3):
    """p(z) = N(0, I), p(x|z) = N(Wz + c, σ²I): log p(x) and the exact posterior are known."""
    g = generator(seed)
    weight = torch.randn(data, latent, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    shift = torch.randn(data, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    x = torch.randn(4, data, generator=g, dtype=torch.float64, device=TEST_DEVICE)
    marginal = torch.distributions.MultivariateNormal(
        shift, weight @ weight.T + noise ** 2 * torch.eye(data, dtype=torch.float64,
                                                          device=TEST_DEVICE))
    precision = torch.eye(latent, dtype=torch.float64, device=TEST_DEVICE) + weight.T @ weight / noise ** 2
    covariance = torch.linalg.inv(precision)
    mean = (x - shift) @ weight @ covariance / noise ** 2
    return x, marginal.log_prob(x), mean, covariance, (lambda z: z @ weight.T + shift), noise


def test_log_likelihood_exact_with_the_true_posterior(backend):
    """With q the exact posterior every importance weight is p(x): any S and chunking give
    log p(x) to rounding (a diagonal posterior needs a one-dimensional latent)."""
    x, log_px, mean, covariance, decode, noise = _linear_gaussian(latent=1)
    logvar = torch.log(covariance.diagonal()).expand_as(mean)
    for samples, chunk in ((1, 1), (7, 3), (50, 50)):
        got = fastvae.log_likelihood(x, mean, logvar, decode, n_samples=samples,
                                     chunk_size=chunk, sigma=noise)
        torch.testing.assert_close(got, log_px, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bad, error, match", [
    (dict(n_samples=0), ValueError, r"n_samples must be >= 1, got 0"),
    (dict(n_samples=None), TypeError, r"n_samples must be an int, got NoneType"),
    (dict(chunk_size=0), ValueError, r"chunk_size must be >= 1, got 0"),
    (dict(chunk_size=2.5), TypeError, r"chunk_size must be an int, got float"),
])
def test_log_likelihood_refuses_bad_counts(backend, bad, error, match):
    x, _, mean, covariance, decode, noise = _linear_gaussian(latent=1)
    logvar = torch.log(covariance.diagonal()).expand_as(mean)
    with pytest.raises(error, match=match):
        fastvae.log_likelihood(x, mean, logvar, decode, sigma=noise, **bad)


def test_log_likelihood_tightens_towards_log_px(backend):
    """With a diagonal q wider than the posterior, the ELBO (the mean log weight) stays a KL
    below log p(x) while the 4000-sample bound reaches it."""
    x, log_px, mean, covariance, decode, noise = _linear_gaussian(seed=1)
    logvar = (torch.log(covariance.diagonal()) + 0.5).expand_as(mean)
    g = generator(2)
    z = fastvae.reparameterize(mean, logvar, n_samples=2000, generator=g)
    elbo = oracle.log_weights(x, decode(z), z, mean, logvar, sigma=noise).mean(0)
    assert (elbo < log_px - 0.05).all()
    many = fastvae.log_likelihood(x, mean, logvar, decode, n_samples=4000, chunk_size=500,
                                  sigma=noise, generator=g)
    torch.testing.assert_close(many, log_px, rtol=0, atol=0.02)


# ----------------------------------------------------------------------------------------------
# torch.compile and opcheck
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_compiled_step_matches_eager(backend, estimator):
    """fullgraph=True over encoder, sampling, DReG tie, decoder and bound: the same loss and,
    from its backward, the same parameter gradients as eager."""
    from torch._dynamo.testing import CompileCounterWithBackend
    model, x = _model_and_data(3)

    def loss_of(x):
        mu, logvar = model.encoder(x).chunk(2, -1)
        z = fastvae.reparameterize(mu, logvar, n_samples=4, seed=5)
        decoder_input, tie = fastvae.dreg(z) if estimator == "dreg" else (z, None)
        return fastvae.iwae_loss(x, model.decoder(decoder_input), z, mu, logvar,
                                 likelihood="bernoulli", dreg=tie)

    def loss_and_grads(fn):
        loss = fn(x)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    got = loss_and_grads(torch.compile(loss_of, backend=counter, fullgraph=True))
    want = loss_and_grads(loss_of)
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w)
    assert counter.frame_count == 1


def _op_args(backend, dtype=torch.float64, likelihood=0, log_scale=None, prior=None,
             offset=False, reduction=1, dreg=False, grad_scale=False, samples=3):
    g = generator(23)

    def leaf(*shape, dt=dtype):
        return torch.randn(shape, generator=g, dtype=torch.float64,
                           device=TEST_DEVICE).to(dt).requires_grad_()

    batch, data, latent = 4, 5, 2
    x, x_hat, z = leaf(batch, data), leaf(samples, batch, data), leaf(samples, batch, latent)
    theta = None if log_scale is None else leaf(*log_scale)
    priors = (None, None) if prior is None else (leaf(prior, latent), leaf(prior, latent))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tie = leaf(samples, batch, dt=acc) if offset else None
    inputs = (x, x_hat, theta, z, leaf(batch, latent), leaf(batch, latent), *priors, tie)
    scale = torch.rand(batch, generator=g, dtype=torch.float64, device=TEST_DEVICE).to(acc)
    needs = [t is not None for t in inputs]
    return (*inputs, scale if grad_scale else None, likelihood, 0.2, reduction, dreg, needs,
            backend)


@pytest.mark.parametrize("options", [
    dict(), dict(likelihood=1, prior=1, offset=True, dreg=True, reduction=2),
    dict(log_scale=(1, 4, 5), prior=4, reduction=0, grad_scale=True),
    dict(dtype=torch.float32, likelihood=2, log_scale=(3, 1, 1), offset=True),
], ids=str)
def test_opcheck_iwae(backend, options):
    torch.library.opcheck(torch.ops.fastvae.iwae.default, _op_args(backend, **options))


# ----------------------------------------------------------------------------------------------
# a mixture-of-Gaussians prior in the bound
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_mixture_prior_matches_distributions(backend, estimator, reduction):
    """log p(z) of a learned mixture in the log weights (an [S, B] offset to them): the bound
    and the gradients of the model and of the mixture's means, log-variances and logits against
    plain autograd."""
    from torch import distributions as dist
    model, x = _model_and_data(4)
    row_weights = _row_weights(reduction, x.shape[0])
    g = generator(6)
    components, latent = 4, 3
    prior = fastvae.GaussianMixture(*(
        torch.randn(shape, generator=g, dtype=torch.float64, device=TEST_DEVICE).requires_grad_()
        for shape in ((components, latent), (components, latent), (components,))))
    mu, logvar = model.encoder(x).chunk(2, -1)
    z = fastvae.reparameterize(mu, logvar, n_samples=5, seed=3)
    decoder_input, tie = fastvae.dreg(z) if estimator == "dreg" else (z, None)
    loss = _weighed(fastvae.iwae_loss(x, model.decoder(decoder_input), z, mu, logvar,
                                      likelihood="bernoulli", prior=prior, dreg=tie,
                                      reduction=reduction), row_weights)
    parameters = [*model.parameters(), *prior]
    got = torch.autograd.grad(loss, parameters)

    mixture = dist.MixtureSameFamily(dist.Categorical(logits=prior.logits), dist.Independent(
        dist.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1))

    def log_w(z, mu, logvar):
        log_px = -F_bce(model.decoder(z), x)
        return log_px + mixture.log_prob(z) - dist.Independent(
            dist.Normal(mu, torch.exp(0.5 * logvar)), 1).log_prob(z)

    want_loss, want = _surrogate(log_w, z, *model.encoder(x).chunk(2, -1),
                                 list(model.encoder.parameters()),
                                 [*model.decoder.parameters(), *prior], estimator, row_weights)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, rtol=1e-8, atol=1e-11)


def F_bce(logits, x):
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none").sum(-1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("class_dim", [-1, 1])
def test_categorical_likelihood_in_the_bound(backend, estimator, class_dim, reduction):
    """The categorical likelihood's per-sample NLL in the log weights (an [S, B] offset to
    them): the bound and the model gradients against plain autograd with F.cross_entropy."""
    model, x = _model_and_data(5)
    row_weights = _row_weights(reduction, x.shape[0])
    classes = 4
    decoder = torch.nn.Linear(3, 8 * classes).double().to(TEST_DEVICE)
    target = torch.randint(0, classes, (6, 8), generator=generator(8), device=TEST_DEVICE)

    def logits_of(z):
        logits = decoder(z).unflatten(-1, (8, classes))
        return logits if class_dim == -1 else logits.movedim(-1, -2).contiguous()

    mu, logvar = model.encoder(x).chunk(2, -1)
    z = fastvae.reparameterize(mu, logvar, n_samples=3, seed=9)
    decoder_input, tie = fastvae.dreg(z) if estimator == "dreg" else (z, None)
    loss = _weighed(fastvae.iwae_loss(target, logits_of(decoder_input), z, mu, logvar,
                                      likelihood="categorical", class_dim=class_dim, dreg=tie,
                                      reduction=reduction), row_weights)
    parameters = [*model.encoder.parameters(), *decoder.parameters()]
    got = torch.autograd.grad(loss, parameters)

    def log_w(z, mu, logvar):
        logits = decoder(z).unflatten(-1, (8, classes))
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 2), target.expand(
            3, 6, 8).flatten(), reduction="none").view(3, 6, 8).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_posterior = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
        return log_prior - log_posterior - nll

    want_loss, want = _surrogate(log_w, z, *model.encoder(x).chunk(2, -1),
                                 list(model.encoder.parameters()), list(decoder.parameters()),
                                 estimator, row_weights)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-11)

