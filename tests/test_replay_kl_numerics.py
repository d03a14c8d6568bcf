"""fused_replay_kl at the edges of floating point: second-order gradients (refused, never a silent 0),
tiny and huge temperatures, non-finite student logits and masked positions holding inf/NaN.

Every value is compared with the float64 full-logits reference (``reference_replay_kl``), which
differentiates a plain log-softmax with autograd."""

import math

import pytest
import torch

import selfreplay_fast as sf

from conftest import device_for
from replay_cases import assert_close_to_reference, make_case, rel_err

IMPLS = ["torch", "triton"]
MODES = ["tail", "sampled", "topk"]


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


# --- item 8: gradients at tiny and huge temperatures -------------------------------------------------

# Every temperature at which fp32 logits / T (|x| < 20 here) stay finite. At 1e-7 the scaled logits are
# ~1e8, where an fp32 ulp is 8: any per-row scalar folded into them (log 1/T, log |c|) is lost.
TEMPERATURES = [1e-2, 1e-4, 1e-6, 1e-7, 1e-8, 1e3, 1e6]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_fp32_gradients_at_extreme_temperatures(impl, mode, temperature):
    reduction = ["mean", "sum", "none"][TEMPERATURES.index(temperature) % 3]
    case = make_case((2, 3), 8, 37, 4, mode, seed=TEMPERATURES.index(temperature), temperature=temperature,
                     with_tail=mode == "tail" and temperature < 1e-5)
    assert_close_to_reference(case, impl, torch.float32, 1e-4, reduction, chunk_size=4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1e-7, 1e-8])
def test_tail_gradient_with_the_student_peaked_on_the_slots(impl, temperature):
    """1 - Q underflows to exp(-1e8) while the teacher leaves 30% in the tail: the off-slot gradient
    -r q_v / (1 - Q) is r exp(z_v - LSE_c), finite and O(1); it must not come from r / (1 - Q) * q_v."""
    vocab = 7
    x = torch.tensor([[5.0, 4.0, 1.0, 0.5, -1.0, 2.0, 3.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.5), math.log(0.2)]], dtype=torch.float32)
    eye = torch.eye(vocab, dtype=torch.float64)
    dev = device_for(impl)
    grads = []
    for dtype, fn, kw in [(torch.float64, sf.reference_replay_kl, {}), (torch.float32, sf.fused_replay_kl, {"impl": impl})]:
        d = dev if fn is sf.fused_replay_kl else "cpu"
        h = x.to(d, dtype, copy=True).requires_grad_(True)
        loss = fn(h, eye.to(d, dtype), ids.to(d), lp.to(d), temperature=temperature, reduction="sum", **kw)
        loss.backward()
        grads.append((loss.detach(), h.grad))
    (ref_loss, ref_grad), (loss, grad) = grads
    assert ref_grad.abs().max() > 1e6  # 1/T times O(1) probabilities
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4
