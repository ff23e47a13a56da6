"""fastvae inside autocast: bfloat16 on CPU, bfloat16 and float16 on CUDA. Activations and
their gradients keep autocast's dtype, the loss is float32, and the result is close to the
same step without autocast."""
import pytest
import torch
from torch import nn

import fastvae
from cases import TEST_DEVICE
from conftest import cpu_only, cuda_only

SAMPLES = 2


def autocast_step(dtype, autocast, likelihood):
    """One step of a Linear VAE with a per-element decoder log-scale spanning −10…+10.
    Returns the loss, parameter gradients, and the dtypes of activations and their gradients."""
    device = TEST_DEVICE.type
    torch.manual_seed(0)
    features, latent, rows = 10, 3, 8
    encoder = nn.Linear(features, 2 * latent).to(TEST_DEVICE)
    decoder = nn.Linear(latent, 2 * features).to(TEST_DEVICE)
    x = torch.randn(rows, features, device=TEST_DEVICE)
    offset = torch.linspace(-10.0, 10.0, features, device=TEST_DEVICE)
    seen = {}

    def watch(name, t):
        t.register_hook(lambda g: seen.__setitem__(name, (t.dtype, g.dtype, bool(g.isfinite().all()))))
        return t

    keyword = {"gaussian": "x_logvar", "laplace": "x_logscale"}[likelihood]
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        mu, logvar = encoder(x).chunk(2, dim=-1)
        z = fastvae.reparameterize(watch("mu", mu), watch("logvar", logvar), SAMPLES, seed=11)
        x_hat, x_log_scale = decoder(watch("z", z)).chunk(2, dim=-1)
        x_log_scale = x_log_scale + offset.to(x_log_scale.dtype)
        loss = fastvae.elbo_loss(x, watch("x_hat", x_hat), mu, logvar, likelihood=likelihood,
                                 **{keyword: watch("x_log_scale", x_log_scale)}, free_bits=0.05)
    loss.backward()
    params = list(encoder.named_parameters(prefix="encoder")) + list(decoder.named_parameters(prefix="decoder"))
    return loss.detach(), {n: p.grad for n, p in params}, seen


def check_autocast(dtype, likelihood):
    loss, grads, seen = autocast_step(dtype, True, likelihood)
    want_loss, want_grads, _ = autocast_step(dtype, False, likelihood)
    assert loss.dtype == torch.float32 and loss.isfinite()
    assert set(seen) == {"mu", "logvar", "z", "x_hat", "x_log_scale"}
    for name, (input_dtype, grad_dtype, finite) in seen.items():
        assert input_dtype == dtype and grad_dtype == dtype, (name, input_dtype, grad_dtype)
        assert finite, f"non-finite gradient for {name}"
    torch.testing.assert_close(loss, want_loss, rtol=2e-2, atol=0)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and grad.isfinite().all(), name
        error = (grad - want_grads[name]).norm() / want_grads[name].norm()
        assert error < 0.1, f"{name}: relative error {error:.3g} against float32"


@cpu_only
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
def test_autocast_bfloat16_cpu(backend, likelihood):
    check_autocast(torch.bfloat16, likelihood)


@cuda_only
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda(backend, dtype, likelihood):
    check_autocast(dtype, likelihood)
