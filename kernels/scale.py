"""``grad * upstream`` with the upstream scalar read from device memory (no host sync).

The loss computes its gradients in the forward pass; backward only scales them by the
upstream gradient. The product matches PyTorch's ``grad * upstream.to(grad.dtype)``: the
factor is rounded to the gradient's dtype, the product formed exactly in the wider type and
rounded once.
"""
import torch
import triton
import triton.language as tl

from ._convert import narrow, widen
from ._launch import accumulation_type, tuning_configs


@triton.autotune(configs=tuning_configs([triton.Config({"BLOCK": b}, num_warps=w)
                                         for b in (1024, 4096) for w in (4, 8)], BLOCK=4096),
                 key=["numel"])
@triton.jit
def _scale_kernel(out_ptr, grad_ptr, upstream_ptr, numel, ACC: tl.constexpr,
                  BLOCK: tl.constexpr):
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offset < numel
    dtype = out_ptr.dtype.element_ty
    factor = widen(narrow(widen(tl.load(upstream_ptr), ACC), dtype), ACC)
    grad = widen(tl.load(grad_ptr + offset, mask=valid), ACC)
    tl.store(out_ptr + offset, narrow(grad * factor, dtype), mask=valid)


def scale_by_upstream(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """A new tensor ``grad * upstream`` for a contiguous ``grad`` and a 0-dim ``upstream``."""
    out = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        acc = accumulation_type(grad, upstream)
        _scale_kernel[lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)](out, grad, upstream,
                                                                         numel, ACC=acc)
    return out
