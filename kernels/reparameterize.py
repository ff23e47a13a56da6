"""Reparameterised sampling z = μ + exp(½·lv)·ε, ε generated in the kernel (docs/design.md §3).

Element ``i = s*K + k`` of the ``N = S*K`` samples uses output ``j = i // Q`` of
``tl.randn4x(seed, i - j*Q)``, ``Q = ceil(N / 4)``. The forward pass runs one Philox call per
offset and stores its four normals to the four quarters. The backward pass reduces over samples
per latent element, so it regenerates each ε it needs from its own offset (one Philox call per
element instead of per four); ε is never stored.
"""
import torch
import triton
import triton.language as tl

from .._common import sample_shape
from ._convert import narrow, widen
from ._launch import LaunchConfig, accumulation_type, block_for, launch, tunable

# Blocks per program: Philox offsets (each gives four normals) forward, latent elements
# backward. Heuristic: about two waves of programs, longer blocks only for larger problems.
_FORWARD_BLOCKS = (128, 1024)
_BACKWARD_BLOCKS = (128, 512)


def _candidates(smallest, largest):
    """Autotune candidates (``FASTVAE_AUTOTUNE=1``): each power-of-two block from 256, 4 or 8
    warps."""
    blocks = [b for b in (256, 512, 1024) if smallest <= b <= largest]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in blocks for w in (4, 8)]


def _config(work, blocks):
    """BLOCK from the work size; 8 warps from 1024 items per program (each thread keeps
    several independent Philox chains in flight), else 4."""
    block = block_for(work, *blocks)
    return LaunchConfig(dict(BLOCK=block), num_warps=8 if block >= 1024 else 4)


@triton.jit
def _store_quarter(z_ptr, mu_ptr, logvar_ptr, eps, element, in_quarter, latent_size,
                   num_elements, ACC: tl.constexpr):
    valid = in_quarter & (element < num_elements)
    latent = element % latent_size
    mu = widen(tl.load(mu_ptr + latent, mask=valid), ACC)
    logvar = widen(tl.load(logvar_ptr + latent, mask=valid), ACC)
    z = mu + tl.exp(0.5 * logvar) * eps.to(ACC)
    tl.store(z_ptr + element, narrow(z, z_ptr.dtype.element_ty), mask=valid)


@tunable(key=["num_elements"], candidates=_candidates(*_FORWARD_BLOCKS))
@triton.jit
def _reparameterize_forward_kernel(z_ptr, mu_ptr, logvar_ptr, seed_ptr, latent_size,
                                   num_elements, quarter, ACC: tl.constexpr, BLOCK: tl.constexpr):
    seed = tl.load(seed_ptr)
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_quarter = offset < quarter
    eps0, eps1, eps2, eps3 = tl.randn4x(seed, offset)
    # Quarter starts are built by int64 additions: 2*quarter may not fit in int32.
    element = offset
    _store_quarter(z_ptr, mu_ptr, logvar_ptr, eps0, element, in_quarter, latent_size,
                   num_elements, ACC)
    element += quarter
    _store_quarter(z_ptr, mu_ptr, logvar_ptr, eps1, element, in_quarter, latent_size,
                   num_elements, ACC)
    element += quarter
    _store_quarter(z_ptr, mu_ptr, logvar_ptr, eps2, element, in_quarter, latent_size,
                   num_elements, ACC)
    element += quarter
    _store_quarter(z_ptr, mu_ptr, logvar_ptr, eps3, element, in_quarter, latent_size,
                   num_elements, ACC)


@triton.jit
def stream_normal(seed, element, quarter):
    """Normal ``element`` of the stream with quarter length ``quarter``: the same bits as the
    forward pass, but only the Box–Muller pair that holds it is transformed."""
    which = element // quarter
    word0, word1, word2, word3 = tl.randint4x(seed, element - which * quarter)
    first_pair = which < 2
    u_radius = tl.uint_to_uniform_float(tl.where(first_pair, word0, word2))
    u_angle = tl.uint_to_uniform_float(tl.where(first_pair, word1, word3))
    normal_cos, normal_sin = tl.pair_uniform_to_normal(u_radius, u_angle)
    return tl.where(which % 2 == 0, normal_cos, normal_sin)


@tunable(key=["latent_size", "n_samples"], candidates=_candidates(*_BACKWARD_BLOCKS))
@triton.jit
def _reparameterize_backward_kernel(grad_mu_ptr, grad_logvar_ptr, grad_z_ptr, logvar_ptr,
                                    seed_ptr, latent_size, n_samples, quarter,
                                    NEED_MU: tl.constexpr, NEED_LOGVAR: tl.constexpr,
                                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    seed = tl.load(seed_ptr)
    latent = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = latent < latent_size
    sum_grad = tl.zeros((BLOCK,), ACC)
    sum_grad_eps = tl.zeros((BLOCK,), ACC)
    for sample in range(n_samples):  # sequential over samples: the same sum whatever BLOCK is
        element = tl.cast(sample, tl.int64) * latent_size + latent
        grad = widen(tl.load(grad_z_ptr + element, mask=valid, other=0.0), ACC)
        sum_grad += grad
        if NEED_LOGVAR:
            sum_grad_eps += grad * stream_normal(seed, element, quarter).to(ACC)
    if NEED_MU:
        tl.store(grad_mu_ptr + latent, narrow(sum_grad, grad_mu_ptr.dtype.element_ty), mask=valid)
    if NEED_LOGVAR:
        logvar = widen(tl.load(logvar_ptr + latent, mask=valid), ACC)
        grad_logvar = sum_grad_eps * (0.5 * tl.exp(0.5 * logvar))
        tl.store(grad_logvar_ptr + latent, narrow(grad_logvar, grad_logvar_ptr.dtype.element_ty),
                 mask=valid)


def _quarter(num_elements: int) -> int:
    return -(-num_elements // 4)


def reparameterize_forward(mu: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                           n_samples: int) -> torch.Tensor:
    """``z`` of ``sample_shape(mu.shape, n_samples)``; the contract of the reference backend."""
    latent_size = mu.numel()
    num_elements = n_samples * latent_size
    z = torch.empty(sample_shape(mu.shape, n_samples), dtype=mu.dtype, device=mu.device)
    if num_elements == 0:
        return z
    quarter = _quarter(num_elements)

    def grid(meta):
        return (triton.cdiv(quarter, meta["BLOCK"]),)

    launch(_reparameterize_forward_kernel, grid, _config(quarter, _FORWARD_BLOCKS), z, mu,
           logvar, seed, latent_size, num_elements, quarter, ACC=accumulation_type(mu))
    return z


def reparameterize_backward(grad_z: torch.Tensor, logvar: torch.Tensor, seed: torch.Tensor,
                            n_samples: int, need_mu: bool, need_logvar: bool):
    """``(grad_mu, grad_logvar)`` shaped like ``logvar``, empty where not needed; ε is
    regenerated."""
    latent_size = logvar.numel()

    def output(needed):
        return logvar.new_empty(logvar.shape if needed else 0)

    grad_mu, grad_logvar = output(need_mu), output(need_logvar)
    if latent_size == 0 or not (need_mu or need_logvar):
        return grad_mu, grad_logvar

    def grid(meta):
        return (triton.cdiv(latent_size, meta["BLOCK"]),)

    launch(_reparameterize_backward_kernel, grid, _config(latent_size, _BACKWARD_BLOCKS),
           grad_mu, grad_logvar, grad_z, logvar, seed, latent_size, n_samples,
           _quarter(n_samples * latent_size), NEED_MU=need_mu, NEED_LOGVAR=need_logvar,
           ACC=accumulation_type(logvar))
    return grad_mu, grad_logvar
