"""fused_replay_kl at the edges of floating point: second-order gradients (refused, never a silent 0),
tiny and huge temperatures, non-finite student logits and masked positions holding inf/NaN.

Every value is compared with the float64 full-logits reference (``reference_replay_kl``), which
differentiates a plain log-softmax with autograd."""

import math

import pytest
import torch

import selfreplay_fast as sf

from conftest import device_for
from replay_cases import assert_close_to_reference, make_case, rel_err, run

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


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_tied_logits_at_a_tiny_temperature(impl, mode):
    """Two tied top logits at T = 2^-26 (z ~ 7e7, an fp32 ulp of 8): each has q = 1/2, which a
    log-sum-exp held as one fp32 number (z + log 2 rounds to z) would call 1. Tied pairs on the slots,
    off them and across; the inputs and z are exact in fp32, so only the algorithm is measured."""
    temperature = 2.0 ** -26
    x = torch.tensor([[1.0, 1.0, 0.5, -1.0, 0.25],
                      [0.5, 1.0, 0.25, 1.0, -2.0],
                      [1.0, -1.0, 0.5, 0.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 2], [2, 4], [0, 4]])  # tied across, off the slots, on the slots
    lp = torch.log(torch.tensor([[0.5, 0.3], [0.4, 0.6], [0.7, 0.1]]))
    if mode == "sampled":
        lp = lp - lp.logsumexp(-1, keepdim=True)
    eye = torch.eye(5, dtype=torch.float64)
    dev = device_for(impl)
    results = []
    for fn, dtype, d, kw in [(sf.reference_replay_kl, torch.float64, "cpu", {}),
                             (sf.fused_replay_kl, torch.float32, dev, {"impl": impl})]:
        h = x.to(d, dtype, copy=True).requires_grad_(True)
        loss = fn(h, eye.to(d, dtype), ids.to(d), lp.float().to(d), mode=mode, temperature=temperature,
                  reduction="sum", **kw)
        loss.backward()
        results.append((loss.detach(), h.grad))
    (ref_loss, ref_grad), (loss, grad) = results
    assert ref_grad.abs().max() * temperature > 0.1
    assert rel_err(loss, ref_loss) <= 1e-6
    assert rel_err(grad, ref_grad) <= 1e-4


# --- item 6: non-finite student logits, masked positions holding inf/NaN ----------------------------

NONFINITE = [float("nan"), float("inf"), float("-inf")]
# Where the bad value sits: a bias entry / a weight row off every row's slots or on row 0's first slot,
# or the hidden state of one counted position.
PLACES = ["bias_off", "bias_on", "weight_off", "hidden"]


def _nonfinite_case(mode, place, value, seed):
    case = make_case((5,), 6, 19, 3, mode, seed=seed, mask=False, with_tail=mode == "tail" and seed % 2 == 0)
    ids = case.teacher_ids
    off = next(v for v in range(19) if not (ids == v).any())
    on = int(ids[0][ids[0] >= 0][0])
    if place == "hidden":
        case.hidden[3, 2] = value
    elif place.startswith("bias"):
        case.bias[off if place == "bias_off" else on] = value
    else:
        case.weight[off] = value
    return case


def _loss_and_grads(fn, case, dtype, device, **kw):
    h, w, b = case.leaves(dtype, device)
    ids, lp, tkw = case.teacher(device)
    loss = fn(h, w, ids, lp, bias=b, reduction="none", **tkw, **kw)
    loss.sum().backward()
    return loss.detach().double().cpu(), [g.double().cpu() for g in (h.grad, w.grad, b.grad)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("place", PLACES)
def test_nonfinite_logits_propagate_as_in_the_reference(impl, mode, place):
    """Counted positions: NaN exactly where the reference's loss is NaN, +-inf where it is +-inf, the
    same value elsewhere; a NaN loss never comes with finite gradients, and where every gradient of the
    reference is finite (a -inf logit is a token of probability 0), so is ours, and close."""
    for seed, value in enumerate(NONFINITE):
        case = _nonfinite_case(mode, place, value, seed)
        ref_loss, ref_grads = _loss_and_grads(sf.reference_replay_kl, case, torch.float64, "cpu")
        loss, grads = _loss_and_grads(sf.fused_replay_kl, case, torch.float32, device_for(impl), impl=impl)
        what = f"{place}={value}"
        assert torch.equal(torch.isnan(loss), torch.isnan(ref_loss)), f"{what}: NaN at {loss} vs {ref_loss}"
        torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5, equal_nan=True, msg=what)
        if torch.isnan(ref_loss).any():
            assert not all(torch.isfinite(g).all() for g in grads), f"{what}: finite gradients of a NaN loss"
        if all(torch.isfinite(g).all() for g in ref_grads):
            for g, e in zip(grads, ref_grads):
                assert torch.isfinite(g).all() and rel_err(g, e) <= 1e-4, what


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_positions_holding_inf_or_nan_contribute_nothing(impl, mode, reduction):
    """Whatever the hidden state of a masked position holds, the loss and every gradient are those of
    the same batch with that position's hidden state set to 0, and its hidden gradient is exactly 0."""
    dev = device_for(impl)
    for seed, value in enumerate(NONFINITE):
        case = make_case((2, 4), 6, 19, 3, mode, seed=seed + 10, with_tail=mode == "tail")
        case.mask[1, 1:3] = False
        clean = case.hidden.clone()
        clean[~case.mask] = 0.0
        expected = run(sf.reference_replay_kl, _with_hidden(case, clean), torch.float64, "cpu", reduction)
        poisoned = case.hidden.clone()
        poisoned[1, 1] = value
        poisoned[1, 2, 0] = value
        got = run(sf.fused_replay_kl, _with_hidden(case, poisoned), torch.float32, dev, reduction, impl=impl)
        for name, a, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], got, expected):
            assert torch.isfinite(a).all(), f"{name} non-finite with {value} at a masked position"
            assert rel_err(a, e) <= 1e-4, name
        assert got[1][~case.mask.to(got[1].device)].abs().max().item() == 0
        # The reference, too, gives a masked position exactly nothing.
        ref = run(sf.reference_replay_kl, _with_hidden(case, poisoned), torch.float64, "cpu", reduction)
        assert all(torch.isfinite(t).all() for t in ref)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nan_head_with_every_position_masked_gives_exact_zeros(impl, reduction):
    """A NaN bias makes every logit NaN, but no position counts: loss 0, every gradient exactly 0."""
    case = make_case((4,), 6, 19, 3, "tail", seed=5)
    case.mask[:] = False
    case.bias[7] = float("nan")
    loss, *grads = run(sf.fused_replay_kl, case, torch.float32, device_for(impl), reduction, impl=impl)
    assert loss.abs().max().item() == 0
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().max().item() == 0


def test_nonfinite_logits_propagate_on_the_vocab_parallel_path():
    """process_group (one in-process rank): the same non-finite loss as without it."""
    import torch.distributed as dist

    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    for mode in MODES:
        for seed, value in enumerate(NONFINITE):
            case = _nonfinite_case(mode, "bias_off" if seed % 2 else "bias_on", value, seed)
            ref_loss, _ = _loss_and_grads(sf.reference_replay_kl, case, torch.float64, "cpu")
            for impl in IMPLS:
                loss, _ = _loss_and_grads(sf.fused_replay_kl, case, torch.float32, device_for(impl), impl=impl,
                                          process_group=group)
                torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5, equal_nan=True,
                                           msg=f"{impl} {mode} {value}")


def _with_hidden(case, hidden):
    import dataclasses

    return dataclasses.replace(case, hidden=hidden)
