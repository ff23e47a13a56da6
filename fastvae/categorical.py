"""The categorical likelihood of discrete data (pixels as 256-way classes, tokens): the NLL
``logsumexp_k ℓ_k − ℓ_t`` of ``F.cross_entropy``, summed over event dims, in one fused op that
forms the gradient ``softmax(ℓ) − onehot(t)`` in its forward pass (docs/design.md §1).

``categorical_nll`` is the public function; ``elbo_loss(likelihood='categorical')`` uses
``check_categorical`` and ``categorical_outputs`` with the KL of the loss op.
"""
import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _ops
from ._common import Reduction
from ._validation import (CLASS_INDEX_DTYPES, REDUCTIONS, check_class_indices,
                          check_class_target, check_float_tensor, check_same_device,
                          check_values, checking_values, choice)


class CategoricalLayout(NamedTuple):
    """Where ``logits`` keeps its samples and classes, as the checks found it."""
    samples: int        # S; 1 when logits has no sample dim
    classes: int        # K ≥ 1
    classes_last: bool  # [.., K] (else F.cross_entropy's class-second [B, K, *event])


def check_categorical(target: Tensor, logits: Tensor, class_dim) -> CategoricalLayout:
    """Dtypes and shapes of a categorical likelihood's target and logits (no values read)."""
    check_class_target(target)
    check_float_tensor("logits", logits)
    if isinstance(class_dim, bool) or class_dim not in (1, -1):
        raise ValueError(f"class_dim must be -1 (logits [B, *event, K]) or 1 (logits "
                         f"[B, K, *event], as F.cross_entropy), got {class_dim!r}")
    has_samples = logits.dim() - target.dim() - 1
    lead = tuple(logits.shape[max(has_samples, 0):])
    classes_last = class_dim == -1
    event = lead[:-1] if classes_last else lead[:1] + lead[2:]
    if has_samples not in (0, 1) or event != tuple(target.shape):
        layout = "*event, K" if classes_last else "K, *event"
        raise ValueError(f"logits must be [B, {layout}] or [S, B, {layout}] for target of shape "
                         f"{tuple(target.shape)} (class_dim={class_dim}), got "
                         f"{tuple(logits.shape)}")
    classes = lead[-1] if classes_last else lead[1]
    if classes == 0:
        raise ValueError(f"logits must have at least one class, got K = 0 in {tuple(logits.shape)}")
    return CategoricalLayout(logits.shape[0] if has_samples else 1, classes, classes_last)


def check_categorical_values(target: Tensor, logits: Tensor, layout: CategoricalLayout):
    """In the value-checking mode: finite logits and every target a class index."""
    check_values(logits=logits)
    check_class_indices(target, layout.classes)


def categorical_outputs(target: Tensor, logits: Tensor, layout: CategoricalLayout,
                        reduction) -> _ops.CategoricalOutputs:
    """The op on checked arguments: ``[S, B, D, K]`` or ``[S, B, K, D]`` logits (a view of
    contiguous ones) and ``[B, D]`` targets."""
    batch = target.shape[0]
    positions = math.prod(target.shape[1:])
    # One position per datapoint: both layouts are the same memory, and class-last is faster.
    classes_last = layout.classes_last or positions == 1
    inner = (positions, layout.classes) if classes_last else (layout.classes, positions)
    logits4 = logits.reshape(layout.samples, batch, *inner).contiguous()
    if target.dtype not in CLASS_INDEX_DTYPES:
        target = target.long()
    target2 = target.reshape(batch, positions).contiguous()
    needs_grad = [torch.is_grad_enabled() and logits.requires_grad]
    return _ops.categorical(logits4, target2, None, classes_last, int(reduction), needs_grad,
                            device=logits.device)


def per_sample_nll(target: Tensor, logits: Tensor, layout: CategoricalLayout) -> Tensor:
    """``[S, B]``: the NLL of each sample of ``[S, B, ...]`` logits, for the importance-weighted
    bound: the samples become rows of one op call (the targets, K times smaller than the
    logits, are repeated per sample), so the gradient is formed in forward and scaled per
    sample and row in backward."""
    samples, batch = logits.shape[0], target.shape[0]
    rows = target.expand(samples, *target.shape).reshape(samples * batch, *target.shape[1:])
    out = categorical_outputs(rows, logits.flatten(0, 1), layout._replace(samples=1),
                              Reduction.NONE)
    return out.loss.view(samples, batch)


def categorical_nll(target: Tensor, logits: Tensor, *, class_dim: int = -1,
                    reduction: str = "none") -> Tensor:
    """Categorical negative log-likelihood of class indices given **logits**, in nats:
    ``logsumexp_k ℓ_k − ℓ_target`` (``F.cross_entropy``'s, unnormalised logits) summed over
    event dims.

    Args:
        target: ``[B, *event]`` class indices in [0, K), any integer dtype (int64 and uint8
            are read as they are, others widened).
        logits: ``[B, *event, K]`` (class_dim=-1) or ``[B, K, *event]`` (class_dim=1, the
            layout of ``F.cross_entropy``), optionally with S samples first: ``[S, B, ...]``.
            Any floating dtype; the gradient comes back in it.
        reduction: 'none' → ``[B]`` (summed over event dims, averaged over samples);
            'mean' / 'sum' → mean / sum of that over B.
    Returns:
        The NLL in float32 (float64 for float64 logits). A target outside [0, K) is never
        read: it gives a NaN NLL (and gradient) for its datapoint, or a ValueError in the
        value-checking mode (:func:`fastvae.validate_values`).
    """
    layout = check_categorical(target, logits, class_dim)
    reduction = choice("reduction", reduction, REDUCTIONS)
    check_same_device(target=target, logits=logits)
    if checking_values():
        check_categorical_values(target, logits, layout)
    return categorical_outputs(target, logits, layout, reduction).loss
