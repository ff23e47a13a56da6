"""What the shared suite does not cover for the Triton backend: the in-kernel noise stream
(including int64 offsets past 2**31), bitwise repeatability of the partial-sum reductions on
grids with several row groups and tiles, every x_log_scale / prior layout on such grids,
and half-precision error against PyTorch's own.

Runs on CPU under the interpreter: ``TRITON_INTERPRET=1 python -m pytest tests/test_triton.py``.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import backends_under_test

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1"
                       or "triton" not in backends_under_test(),
                       reason="Triton backend tests run on CPU under TRITON_INTERPRET=1"),
]

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import fastvae  # noqa: E402
from fastvae import _philox  # noqa: E402
from fastvae.backends import reference  # noqa: E402
from fastvae.backends import triton as triton_backend  # noqa: E402
from fastvae.kernels.reparameterize import stream_normal  # noqa: E402
from noise import stream_at  # noqa: E402
from op_args import elbo_args  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the noise stream
# ----------------------------------------------------------------------------------------------
SEEDS = [0, 2**32 + 3, 2**63 - 1]  # the last two exercise the high key word


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_samples, latent", [(1, 4 * 1030 - 3), (3, 1367)])
def test_forward_noise_is_the_stream(seed, n_samples, latent):
    """With μ = 0 and lv = 0, z is ε itself: several programs, N not a multiple of 4."""
    zeros = torch.zeros(latent)
    seed_tensor = torch.tensor(seed)
    eps = triton_backend.reparameterize_forward(zeros, zeros, seed_tensor, n_samples)
    want = _philox.normal_stream(seed_tensor, n_samples * latent)
    torch.testing.assert_close(eps, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_samples, latent", [(1, 4 * 300 - 1), (5, 301)])
def test_backward_regenerates_the_forward_noise_bitwise(n_samples, latent):
    """∂lv = ½·Σ_s g·ε·exp(0): with a one-hot upstream on sample s, 2·∂lv is ε_s exactly."""
    zeros = torch.zeros(latent)
    seed = torch.tensor(2**40 + 17)
    eps = triton_backend.reparameterize_forward(zeros, zeros, seed, n_samples).view(n_samples, latent)
    for sample in range(n_samples):
        upstream = torch.zeros(n_samples, latent)
        upstream[sample] = 1.0
        grad_mu, grad_logvar = triton_backend.reparameterize_backward(
            upstream.view(-1), zeros, seed, n_samples, True, True)
        assert torch.equal(grad_mu, torch.ones(latent))
        assert torch.equal(2.0 * grad_logvar, eps[sample])


@triton.jit
def _stream_slice_kernel(out_ptr, seed_ptr, first_element, quarter, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    element = first_element + index.to(tl.int64)
    tl.store(out_ptr + index, stream_normal(tl.load(seed_ptr), element, quarter))


@pytest.mark.parametrize("quarter, first_element", [
    (2**31 + 12345, 3 * (2**31 + 12345) - 5),  # offsets past int32, crossing quarters 2 → 3
    (2**33 + 7, 2 * (2**33 + 7) + 2**32 - 3),  # offsets whose high word is non-zero
])
def test_stream_positions_beyond_int32(quarter, first_element):
    """A >2**31-element z does not fit on this machine; the per-element stream arithmetic the
    backward kernel uses is run at such positions instead (int64 quarter, offset and index)."""
    seed = 987654321
    block = 16
    out = torch.empty(block)
    _stream_slice_kernel[(1,)](out, torch.tensor(seed), first_element, quarter, BLOCK=block)
    elements = torch.arange(first_element, first_element + block, dtype=torch.int64)
    torch.testing.assert_close(out, stream_at(seed, elements, quarter), rtol=1e-6, atol=1e-6)


def test_stream_at_matches_the_reference_stream():
    """The position-wise helper above agrees with ``normal_stream`` where both apply."""
    numel = 4 * 37 - 2
    want = _philox.normal_stream(torch.tensor(5), numel)
    got = stream_at(5, torch.arange(numel), math.ceil(numel / 4))
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# the fused loss on grids with several row groups, event tiles and latent tiles
# ----------------------------------------------------------------------------------------------
# S=2, D=1500: several event tiles; d=20; the 19 rows split over several row groups.
GRID = dict(samples=2, batch=19, features=1500, latent=20)
LAYOUTS = ["SBD", "SB1", "S1D", "S11", "1BD", "1B1", "11D", "111"]  # x_log_scale [Sl, Bl, Dl]


def _compare(args, rtol, atol):
    got = triton_backend.elbo(*args.backend_args())
    want = reference.elbo(*args.backend_args())
    assert len(got) == len(want) == 11
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
    return got, want


@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_log_scale_layout_on_a_multi_program_grid(layout, likelihood):
    args = elbo_args(**GRID, dtype=torch.float64, log_scale=layout, likelihood=likelihood,
                     reduction="sum", grad_scale=True, device=torch.device("cpu"))
    _compare(args, 1e-12, 1e-12)


@pytest.mark.parametrize("prior", [None, "shared", "datapoint"])
@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli", "laplace"])
def test_priors_free_bits_and_likelihoods_on_a_multi_program_grid(prior, likelihood):
    args = elbo_args(**GRID, dtype=torch.float64, prior=prior, free_bits=0.8, likelihood=likelihood,
                     log_scale=None, device=torch.device("cpu"))
    _, want = _compare(args, 1e-12, 1e-12)
    assert not torch.equal(want[2], want[3]), "free bits should clamp some latent dims"


def test_loss_and_gradients_repeat_bitwise():
    args = elbo_args(**GRID, dtype=torch.float32, log_scale="11D", prior="shared", free_bits=0.8,
                     reduction="none", grad_scale=True, device=torch.device("cpu"))
    first = triton_backend.elbo(*args.backend_args())
    second = triton_backend.elbo(*args.backend_args())
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    want = reference.elbo(*args.backend_args())
    for g, w in zip(first, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_outputs_never_alias():
    args = elbo_args(**GRID, dtype=torch.float32, log_scale="SBD", reduction="none",
                     device=torch.device("cpu"))
    outputs = [t for t in triton_backend.elbo(*args.backend_args()) if t.numel()]
    inputs = [t for t in args.inputs.values() if t is not None]
    pointers = [t.untyped_storage().data_ptr() for t in outputs + inputs]
    assert len(set(pointers)) == len(pointers)


# ----------------------------------------------------------------------------------------------
# half precision: no worse than twice PyTorch's own error in the same dtype
# ----------------------------------------------------------------------------------------------
def _plain_elbo(x, x_hat, mu, logvar, x_logvar):
    """The loss in plain PyTorch, evaluated in the inputs' dtype."""
    nll = 0.5 * ((x - x_hat) ** 2 * torch.exp(-x_logvar) + x_logvar + math.log(2 * math.pi))
    kl = 0.5 * (mu * mu + torch.exp(logvar) - 1.0 - logvar)
    return (nll.sum(-1).mean(0) + kl.sum(-1)).mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_error_within_twice_pytorchs(dtype):
    g = torch.Generator().manual_seed(3)  # the interpreter runs on CPU tensors
    shapes = [(64, 96), (2, 64, 96), (64, 8), (64, 8), (96,)]
    scales = [1.0, 1.0, 1.0, 0.5, 0.5]
    exact = [(torch.randn(s, generator=g, dtype=torch.float64) * c).to(dtype).double()
             for s, c in zip(shapes, scales)]

    def loss_and_grads(fn, dtype_):
        leaves = [t.to(dtype_).requires_grad_() for t in exact]
        loss = fn(*leaves)
        return [loss.detach().double()] + [t.double() for t in torch.autograd.grad(loss, leaves)]

    def fused(x, x_hat, mu, logvar, x_logvar):
        with fastvae.use_backend("triton"):
            return fastvae.elbo_loss(x, x_hat, mu, logvar, x_logvar=x_logvar)

    truth = loss_and_grads(_plain_elbo, torch.float64)
    ours = loss_and_grads(fused, dtype)
    pytorch = loss_and_grads(_plain_elbo, dtype)
    names = ["loss", "x", "x_hat", "mu", "logvar", "x_logvar"]
    for name, t, o, p in zip(names, truth, ours, pytorch):
        our_error = (o - t).abs().max().item()
        pytorch_error = (p - t).abs().max().item()
        assert our_error <= 2 * pytorch_error, (name, our_error, pytorch_error)


# ----------------------------------------------------------------------------------------------
# the kernels compile for Ampere and Hopper (tests/triton_compile_check.py, without interpreter)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every_config", [False, True], ids=["heuristic", "every_autotune_config"])
def test_kernels_compile_for_ampere_and_hopper(every_config):
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, os.path.join(os.path.dirname(__file__), "triton_compile_check.py")]
    if every_config:
        environment["FASTVAE_AUTOTUNE"] = "1"
        command.append("--every-config")
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kernel variants compiled" in result.stdout
