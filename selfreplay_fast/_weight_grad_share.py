"""One precomputed lm_head weight gradient for the fused losses of one weighted sum.

``fused_replay_kl`` forms its gradients during the forward and only scales them by the incoming gradient in
backward (docs/design.md, section 3). A training step that adds several fused losses over the same lm_head
(``replay_step`` and ``ReplayTrainer.compute_loss``: task NLL + w * replay loss; ``ReplayKLLoss(loss="kl+nll")``:
(1 - a) KL + a NLL) would keep
one [V, D] weight gradient per loss from its forward to the backward: 1 GiB each at a Llama-3-8B head in bf16.

Inside :func:`shared_weight_grad` the first fused call that precomputes a weight gradient (the owner, loss
coefficient c_0) allocates it; each later call on the same weight tensor (coefficient c_i, set by
:func:`loss_term`: a Python factor over an optional tensor divisor, such as a token count) adds its own
gradient into that buffer times r_i = c_i / c_0 (folded into its row scale), returns no weight gradient, and scales its hidden and bias gradients by g_i / r_i in backward. The owner's
backward scales the buffer by g_0, which gives the sum's gradient g sum_i c_i G_i exactly when each call's
incoming gradient is g_i = c_i g: when the weighted sum is what is backpropagated. So the code that opens a
share returns the parts detached (``replay_step``) or not at all (``ReplayKLLoss``).
"""

from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import NamedTuple, Optional, Union

import torch

_OPEN: contextvars.ContextVar = contextvars.ContextVar("selfreplay_fast_weight_grad_share", default=None)


class _Share:
    def __init__(self):
        # The loss coefficient of the fused calls made now (the product of the open loss_terms): coef / divisor,
        # coef a Python number (0 keeps a call out, decided without a host sync), divisor None (1) or a 0-dim
        # tensor (a token count, on its device: a count is never synced to the host here).
        self.coef = 1.0
        self.divisor: Optional[torch.Tensor] = None
        self.weight: Optional[torch.Tensor] = None  # the tensor whose gradient the buffer is
        self.grad: Optional[torch.Tensor] = None  # the owner's precomputed weight gradient
        self.owner_coef = 1.0
        self.owner_divisor: Optional[torch.Tensor] = None


class Member(NamedTuple):
    grad: torch.Tensor  # the owner's buffer: add this call's weight gradient into it
    rel: Union[float, torch.Tensor]  # this call's coefficient over the owner's (a 0-dim tensor if a divisor differs)


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


def _as_divisor(divisor):
    """A 0-dim tensor in float64 where the device has it (the ratio of two counts is then exact to float64)."""
    if isinstance(divisor, bool) or not isinstance(divisor, (numbers.Real, torch.Tensor)):
        raise TypeError(f"divisor must be None, a Python number or a 0-dim tensor, got {type(divisor).__name__}")
    if isinstance(divisor, torch.Tensor):
        if divisor.numel() != 1:
            raise ValueError(f"divisor must be a scalar tensor, got shape {tuple(divisor.shape)}")
        wide = torch.float32 if divisor.device.type == "mps" else torch.float64
        return divisor.detach().reshape(()).to(wide)
    if not divisor > 0:
        raise ValueError(f"divisor must be > 0, got {divisor!r}")
    return None  # folded into coef by the caller


@contextlib.contextmanager
def loss_term(coef: float = 1.0, divisor=None):
    """The fused calls inside enter the open share's sum multiplied by ``coef / divisor``.

    ``coef``: a Python number (a coefficient of 0 keeps the call out of the share; no host sync decides
    that). ``divisor``: None, a Python number > 0, or a 0-dim tensor that must be > 0 (a token count clamped
    to at least 1, as ``num_items_in_batch``; it is never read on the host)."""
    if isinstance(coef, bool) or not isinstance(coef, numbers.Real):
        raise TypeError(f"coef must be a Python number, got {type(coef).__name__}")
    tensor_divisor = _as_divisor(divisor) if divisor is not None else None
    if divisor is not None and tensor_divisor is None:
        coef = float(coef) / float(divisor)
    share = _OPEN.get()
    if share is None:
        yield
        return
    outer, outer_divisor = share.coef, share.divisor
    share.coef = outer * float(coef)
    if tensor_divisor is not None:
        share.divisor = tensor_divisor if outer_divisor is None else outer_divisor * tensor_divisor.to(outer_divisor)
    try:
        yield
    finally:
        share.coef, share.divisor = outer, outer_divisor


def join(weight: torch.Tensor, grad_dtype: torch.dtype) -> Optional[Member]:
    """For a fused call about to precompute the gradient of ``weight``: the owner's buffer to add it into, or
    None (allocate its own, then :func:`own` it)."""
    share = _OPEN.get()
    if share is None or share.coef == 0.0 or share.grad is None:
        return None
    if share.weight is not weight or share.grad.dtype != grad_dtype:
        return None
    rel = share.coef / share.owner_coef
    if share.divisor is share.owner_divisor:  # both None, or the same tensor
        return Member(share.grad, rel)
    # (coef / divisor) / (owner_coef / owner_divisor), on the divisors' device: no host sync.
    ratio = share.owner_divisor if share.owner_divisor is not None else 1.0
    if share.divisor is not None:
        ratio = ratio / share.divisor
    return Member(share.grad, ratio * rel)


def own(weight: torch.Tensor, grad: torch.Tensor) -> Optional[_Share]:
    """Offers a call's freshly allocated weight gradient as the share's buffer; returns the share when taken
    (the owner's backward must then :func:`release` it)."""
    share = _OPEN.get()
    if share is None or share.coef == 0.0 or share.grad is not None:
        return None
    share.weight, share.grad = weight, grad
    share.owner_coef, share.owner_divisor = share.coef, share.divisor
    return share


def is_unit(rel) -> bool:
    """Whether a member's relative coefficient is exactly the Python 1 (a tensor ratio is never taken as 1:
    deciding that would sync the host)."""
    return not isinstance(rel, torch.Tensor) and rel == 1.0


def release(share: Optional[_Share]) -> None:
    """The owner's backward handed the buffer to autograd: later calls allocate their own."""
    if share is not None:
        share.weight = share.grad = None
