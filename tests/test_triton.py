"""What the shared suite does not cover for the Triton backend: the in-kernel noise stream
(including int64 offsets past 2**31), bitwise repeatability of the partial-sum reductions on
grids with several row groups and tiles, every x_logvar / prior broadcast layout on such grids,
and half-precision error against PyTorch's own.

Runs on CPU under the interpreter: ``TRITON_INTERPRET=1 python -m pytest tests/test_triton.py``.
"""
import itertools
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
from fastvae import _philox, _triton, reference  # noqa: E402
from fastvae.kernels.reparameterize import stream_normal  # noqa: E402

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
    eps = _triton.reparameterize_forward(zeros, zeros, seed_tensor, n_samples)
    want = _philox.normal_stream(seed_tensor, n_samples * latent)
    torch.testing.assert_close(eps, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_samples, latent", [(1, 4 * 300 - 1), (5, 301)])
def test_backward_regenerates_the_forward_noise_bitwise(n_samples, latent):
    """∂lv = ½·Σ_s g·ε·exp(0): with a one-hot upstream on sample s, 2·∂lv is ε_s exactly."""
    zeros = torch.zeros(latent)
    seed = torch.tensor(2**40 + 17)
    eps = _triton.reparameterize_forward(zeros, zeros, seed, n_samples).view(n_samples, latent)
    for sample in range(n_samples):
        upstream = torch.zeros(n_samples, latent)
        upstream[sample] = 1.0
        grad_mu, grad_logvar = _triton.reparameterize_backward(
            upstream.view(-1), zeros, seed, n_samples, True, True)
        assert torch.equal(grad_mu, torch.ones(latent))
        assert torch.equal(2.0 * grad_logvar, eps[sample])


@triton.jit
def _stream_slice_kernel(out_ptr, seed_ptr, first_element, quarter, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    element = first_element + index.to(tl.int64)
    tl.store(out_ptr + index, stream_normal(tl.load(seed_ptr), element, quarter))


def _stream_at(seed: int, elements: torch.Tensor, quarter: int) -> torch.Tensor:
    """Elements of the stream of DESIGN.md §3 at arbitrary int64 positions, in PyTorch."""
    which = elements // quarter
    offset = elements - which * quarter
    key = torch.full_like(offset, seed)
    zeros = torch.zeros_like(offset)
    words = _philox.philox4x32_10(offset & 0xFFFFFFFF, offset >> 32, zeros, zeros,
                                  key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF)
    u1, u2, u3, u4 = (_philox._uniform(w) for w in words)
    normals = torch.stack(_philox._box_muller(u1, u2) + _philox._box_muller(u3, u4))
    return normals.gather(0, which.view(1, -1)).view(-1)


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
    torch.testing.assert_close(out, _stream_at(seed, elements, quarter), rtol=1e-6, atol=1e-6)


def test_stream_at_matches_the_reference_stream():
    """The position-wise helper above agrees with ``normal_stream`` where both apply."""
    numel = 4 * 37 - 2
    want = _philox.normal_stream(torch.tensor(5), numel)
    got = _stream_at(5, torch.arange(numel), math.ceil(numel / 4))
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------------------------
# the fused loss on grids with several row groups, event tiles and latent tiles
# ----------------------------------------------------------------------------------------------
# S=2, D=1500: 3 event tiles of 2x512; d=20: 1 latent tile; the 19 rows split over 2 row groups.
SAMPLES, BATCH, EVENT, LATENT = 2, 19, 1500, 20


def _loss_args(dtype, x_logvar_layout=None, prior_rows=None, free_bits=0.0, bernoulli=False,
               reduction="mean", grad_scale=False, seed=0):
    """Normalised arguments of the backend ``elbo`` (see ``fastvae.reference``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = torch.rand(BATCH, EVENT, generator=g, dtype=torch.float64).to(dtype) if bernoulli \
        else rand(BATCH, EVENT)
    x_hat = rand(SAMPLES, BATCH, EVENT)
    x_logvar = None
    if x_logvar_layout is not None:
        full = (SAMPLES, BATCH, EVENT)
        x_logvar = rand(*(n if keep else 1 for n, keep in zip(full, x_logvar_layout)), scale=0.5)
    mu, logvar = rand(BATCH, LATENT), rand(BATCH, LATENT, scale=0.5)
    prior_mu = prior_logvar = None
    if prior_rows is not None:
        prior_mu, prior_logvar = rand(prior_rows, LATENT, scale=0.5), rand(prior_rows, LATENT,
                                                                            scale=0.5)
    loss_dtype = reference.accumulation_dtype(x, x_hat, x_logvar, mu)
    beta = torch.tensor(0.7, dtype=loss_dtype)
    scale = torch.rand(BATCH, generator=g, dtype=torch.float64).to(loss_dtype) \
        if grad_scale else None
    inputs = (x, x_hat, x_logvar, mu, logvar, prior_mu, prior_logvar)
    needs_grad = [t is not None for t in inputs]
    return (x, x_hat, x_logvar, -0.3, mu, logvar, prior_mu, prior_logvar, beta, free_bits,
            bernoulli, reduction, scale, needs_grad)


def _flatten(outputs):
    loss, nll, kl, kl_term, grads = outputs
    return [loss, nll, kl, kl_term, *grads]


LAYOUTS = list(itertools.product((False, True), repeat=3))  # x_logvar (Sl, Bl, Dl) full or 1


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "lv" + "".join("SBD"[i] if k else "1"
                                                                          for i, k in enumerate(l)))
def test_every_x_logvar_layout_on_a_multi_program_grid(layout):
    args = _loss_args(torch.float64, x_logvar_layout=layout, reduction="sum", grad_scale=True)
    for got, want in zip(_flatten(_triton.elbo(*args)), _flatten(reference.elbo(*args))):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prior_rows", [None, 1, BATCH])
@pytest.mark.parametrize("bernoulli", [False, True])
def test_priors_free_bits_and_likelihoods_on_a_multi_program_grid(prior_rows, bernoulli):
    args = _loss_args(torch.float64, prior_rows=prior_rows, free_bits=0.8, bernoulli=bernoulli)
    got, want = _flatten(_triton.elbo(*args)), _flatten(reference.elbo(*args))
    assert not torch.equal(want[2], want[3]), "free bits should clamp some latent dims"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_loss_and_gradients_repeat_bitwise():
    args = _loss_args(torch.float32, x_logvar_layout=(False, False, True), prior_rows=1,
                      free_bits=0.8, reduction="none", grad_scale=True)
    first = _flatten(_triton.elbo(*args))
    second = _flatten(_triton.elbo(*args))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    want = _flatten(reference.elbo(*args))
    for g, w in zip(first, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_outputs_never_alias():
    args = _loss_args(torch.float32, x_logvar_layout=(True, True, True), reduction="none")
    outputs = [t for t in _flatten(_triton.elbo(*args)) if t.numel()]
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
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
    g = torch.Generator().manual_seed(3)
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
# the kernels compile for Ampere and Hopper
# ----------------------------------------------------------------------------------------------
# Run without the interpreter: every kernel launch of the backend functions below is replaced
# by compiling that kernel to a cubin for sm_80 and sm_90 (Triton bundles ptxas, so no GPU is
# needed): with every autotune config for the first loss, with the first config elsewhere. Catches what the interpreter cannot: type errors of
# the compiler, float64 maths lowering, register-file limits of the tile shapes.
_COMPILE_EVERY_LAUNCH = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction
from fastvae import _triton

POINTER = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16",
           torch.float16: "*fp16", torch.int64: "*i64"}
TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
compiled = set()
every_config = False

def compile_launch(fn, args, kwargs, options):
    bound = {**dict(zip(fn.arg_names, args)), **kwargs}
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name]
        if param.is_constexpr or value is None:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER[value.dtype]
        elif param.annotation_type:
            signature[param.name] = param.annotation_type
        else:
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
    key = (fn.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
           repr(sorted(options.items())))
    if key not in compiled:
        compiled.add(key)
        for target in TARGETS:
            kernel = triton.compile(ASTSource(fn, signature, constexprs), target=target,
                                    options=options)
            assert kernel.asm["cubin"], (fn.__name__, target)

def autotuned_run(self, *args, grid, warmup=False, **kwargs):
    for config in self.configs if every_config else self.configs[:1]:
        compile_launch(self.fn, args, {**kwargs, **config.kwargs},
                       {"num_warps": config.num_warps, "num_stages": config.num_stages})

def jit_run(self, *args, grid, warmup=False, **kwargs):
    compile_launch(self, args, kwargs, {})

Autotuner.run, JITFunction.run = autotuned_run, jit_run

def tensor(shape, dtype):
    return torch.zeros(shape, dtype=dtype)

for dtype in (torch.float32, torch.bfloat16, torch.float64):
    latent = tensor(40, dtype)
    _triton.reparameterize_forward(latent, latent, torch.tensor(1), 3)
    _triton.reparameterize_backward(tensor(120, dtype), latent, torch.tensor(1), 3, True, True)

S, B, D, d = 2, 6, 300, 5
every_config = True
for data, latents, lv_shape, priors, free_bits, bernoulli in [
        (torch.float32, torch.float32, (S, B, D), B, 0.5, False),
        (torch.bfloat16, torch.float32, (1, 1, D), 1, 0.0, False),
        (torch.float16, torch.float16, (S, 1, 1), None, 0.5, False),
        (torch.float64, torch.float64, (1, B, 1), 1, 0.5, False),
        (torch.bfloat16, torch.bfloat16, None, None, 0.0, True)]:
    loss_dtype = torch.float64 if torch.float64 in (data, latents) else torch.float32
    prior = None if priors is None else tensor((priors, d), latents)
    x_logvar = None if lv_shape is None else tensor(lv_shape, data)
    inputs = (tensor((B, D), data), tensor((S, B, D), data), x_logvar, tensor((B, d), latents),
              tensor((B, d), latents), prior, prior)
    _triton.elbo(*inputs[:3], 0.0, *inputs[3:], torch.tensor(1.0, dtype=loss_dtype), free_bits,
                 bernoulli, "mean", tensor(B, loss_dtype), [t is not None for t in inputs])
    every_config = False
print(len(compiled), "kernel variants compiled for sm_80 and sm_90")
"""


def test_kernels_compile_for_ampere_and_hopper():
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_EVERY_LAUNCH], env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kernel variants compiled" in result.stdout
