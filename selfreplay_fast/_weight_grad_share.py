"""One precomputed lm_head weight gradient for the fused losses of one weighted sum.

``fused_replay_kl`` forms its gradients during the forward and only scales them by the incoming gradient in
backward (docs/design.md, section 3). A training step that adds several fused losses over the same lm_head
(``replay_step``: task NLL + w * replay loss; ``ReplayKLLoss(loss="kl+nll")``: (1 - a) KL + a NLL) would keep
one [V, D] weight gradient per loss from its forward to the backward: 1 GiB each at a Llama-3-8B head in bf16.

Inside :func:`shared_weight_grad` the first fused call that precomputes a weight gradient (the owner, loss
coefficient c_0) allocates it; each later call on the same weight tensor (coefficient c_i, set by
:func:`loss_term`) adds its own gradient into that buffer times r_i = c_i / c_0 (folded into its row scale),
returns no weight gradient, and scales its hidden and bias gradients by g_i / r_i in backward. The owner's
backward scales the buffer by g_0, which gives the sum's gradient g sum_i c_i G_i exactly when each call's
incoming gradient is g_i = c_i g: when the weighted sum is what is backpropagated. So the code that opens a
share returns the parts detached (``replay_step``) or not at all (``ReplayKLLoss``).
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import NamedTuple, Optional

import torch

_OPEN: contextvars.ContextVar = contextvars.ContextVar("selfreplay_fast_weight_grad_share", default=None)


class _Share:
    def __init__(self):
        self.coef = 1.0  # the loss coefficient of the fused calls made now (product of the open loss_terms)
        self.weight: Optional[torch.Tensor] = None  # the tensor whose gradient the buffer is
        self.grad: Optional[torch.Tensor] = None  # the owner's precomputed weight gradient
        self.owner_coef = 1.0


class Member(NamedTuple):
    grad: torch.Tensor  # the owner's buffer: add this call's weight gradient into it
    rel: float  # this call's coefficient over the owner's


@contextlib.contextmanager
def shared_weight_grad():
    """The fused calls inside share one weight gradient per lm_head (joins a share already open)."""
    if _OPEN.get() is not None:
        yield
        return
    token = _OPEN.set(_Share())
    try:
        yield
    finally:
        _OPEN.reset(token)


@contextlib.contextmanager
def loss_term(coef: float):
    """The fused calls inside enter the open share's sum multiplied by ``coef`` (a Python number: a
    coefficient of 0 keeps the call out of the share, no host sync decides that)."""
    if isinstance(coef, bool) or not isinstance(coef, numbers.Real):
        raise TypeError(f"coef must be a Python number, got {type(coef).__name__}")
    share = _OPEN.get()
    if share is None:
        yield
        return
    outer = share.coef
    share.coef = outer * float(coef)
    try:
        yield
    finally:
        share.coef = outer


def join(weight: torch.Tensor, grad_dtype: torch.dtype) -> Optional[Member]:
    """For a fused call about to precompute the gradient of ``weight``: the owner's buffer to add it into, or
    None (allocate its own, then :func:`own` it)."""
    share = _OPEN.get()
    if share is None or share.coef == 0.0 or share.grad is None:
        return None
    if share.weight is not weight or share.grad.dtype != grad_dtype:
        return None
    return Member(share.grad, share.coef / share.owner_coef)


def own(weight: torch.Tensor, grad: torch.Tensor) -> Optional[_Share]:
    """Offers a call's freshly allocated weight gradient as the share's buffer; returns the share when taken
    (the owner's backward must then :func:`release` it)."""
    share = _OPEN.get()
    if share is None or share.coef == 0.0 or share.grad is not None:
        return None
    share.weight, share.grad, share.owner_coef = weight, grad, share.coef
    return share


def release(share: Optional[_Share]) -> None:
    """The owner's backward handed the buffer to autograd: later calls allocate their own."""
    if share is not None:
        share.weight = share.grad = None
