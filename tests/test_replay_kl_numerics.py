"""fused_replay_kl at the edges of floating point: second-order gradients (refused, never a silent 0),
tiny and huge temperatures, non-finite student logits and masked positions holding inf/NaN.

Every value is compared with the float64 full-logits reference (``reference_replay_kl``), which
differentiates a plain log-softmax with autograd."""

import math

import pytest
import torch

import selfreplay_fast as sf

from conftest import device_for
from replay_cases import make_case, rel_err

IMPLS = ["torch", "triton"]
MODES = ["tail", "sampled", "topk"]


def _leaves(case, dtype, device):
    return case.leaves(dtype, device)


# --- item 7: second-order gradients ----------------------------------------------------------------

DOUBLE_BACKWARD = "does not support double backward"


@pytest.mark.parametrize("impl", IMPLS)
def test_hvp_raises_instead_of_returning_zero(impl):
    case = make_case((3,), 4, 11, 3, "tail", seed=1, mask=False)
    dev = device_for(impl)
    ids, lp, kw = case.teacher(dev)
    weight = case.weight.float().to(dev)

    def loss_of(h):
        return sf.fused_replay_kl(h, weight, ids, lp, impl=impl, **kw)

    # The reference's Hessian-vector product is not 0: a silent 0 would be a wrong number.
    h64 = case.hidden.clone()
    v = torch.ones_like(h64)
    _, ref_hvp = torch.autograd.functional.hvp(
        lambda h: sf.reference_replay_kl(h, case.weight, *case.teacher()[:2], **case.teacher()[2]), h64, v
    )
    assert ref_hvp.abs().max() > 1e-3
    with pytest.raises(RuntimeError, match=DOUBLE_BACKWARD):
        torch.autograd.functional.hvp(loss_of, case.hidden.float().to(dev), v.float().to(dev))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_penalty_raises_and_names_the_way_out(impl):
    case = make_case((3,), 4, 11, 3, "sampled", seed=2, mask=False)
    dev = device_for(impl)
    h, w, b = case.leaves(torch.float32, dev)
    ids, lp, kw = case.teacher(dev)
    loss = sf.fused_replay_kl(h, w, ids, lp, bias=b, impl=impl, **kw)
    with pytest.raises(RuntimeError, match=f"{DOUBLE_BACKWARD}.*reference_replay_kl"):
        (grad_h,) = torch.autograd.grad(loss, h, create_graph=True)
        (grad_h.square().sum()).backward()


def test_first_order_backward_still_works_after_the_check():
    case = make_case((3,), 4, 11, 3, "tail", seed=3)
    h, w, b = case.leaves(torch.float32)
    ids, lp, kw = case.teacher()
    sf.fused_replay_kl(h, w, ids, lp, bias=b, impl="torch", **kw).backward()
    rh, rw, rb = case.leaves(torch.float64)
    sf.reference_replay_kl(rh, rw, ids, lp, bias=rb, **kw).backward()
    assert rel_err(h.grad, rh.grad) <= 1e-4 and rel_err(w.grad, rw.grad) <= 1e-4
