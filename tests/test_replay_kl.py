"""fused_replay_kl against the float64 full-logits reference, for every implementation.

Tolerances (documented in docs/design.md, section 5): fp32 inputs, relative error <= 1e-4 for the
loss and every gradient (norm-wise); bf16 inputs (logits still accumulated in fp32), <= 2e-2.
"""

import itertools
import warnings
import math

import pytest
import torch
import torch.nn.functional as F

import selfreplay_fast as sf
from selfreplay_fast import replay_kl as rk
from selfreplay_fast._inputs import prepare_replay_kl_inputs

from conftest import DEVICES, device_for
from replay_cases import assert_close_to_reference, log_mass_outside, make_case, rel_err, run

IMPLS = ["torch", "triton"]
MODES = ["tail", "sampled", "topk"]


# --- the reference itself, against formulas written out independently ------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_reference_full_vocab_tail_equals_full_kl(temperature):
    case = make_case((3, 4), dim=6, vocab=9, k=9, mode="tail", unused_slots=False, mask=False, seed=3,
                     temperature=temperature)
    teacher = case.extra["teacher"]
    logits = case.hidden.reshape(-1, 6) @ case.weight.T + case.bias
    log_q = torch.log_softmax(logits / temperature, -1)
    expected = F.kl_div(log_q, teacher, log_target=True, reduction="batchmean")
    for impl in IMPLS + ["reference"]:
        fn = sf.reference_replay_kl if impl == "reference" else sf.fused_replay_kl
        kw = {} if impl == "reference" else {"impl": impl}
        lp = teacher.gather(1, case.teacher_ids.reshape(12, 9)).reshape(3, 4, 9)  # exact, not fp32
        args = [t.to(device_for(impl)) for t in (case.hidden, case.weight, case.teacher_ids, lp, case.bias)]
        got = fn(*args[:4], bias=args[4], temperature=temperature, **kw)
        assert abs(got.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item())), impl


@pytest.mark.parametrize("mode", MODES)
def test_reference_gradient_matches_stated_formula(mode):
    """dL/dz from the issue's closed forms, with z the logits (W = I, D = V, T = 1)."""
    vocab = 10
    case = make_case((6,), dim=vocab, vocab=vocab, k=4, mode=mode, bias=False, mask=False, seed=5)
    eye = torch.eye(vocab, dtype=torch.float64)
    z = case.hidden.reshape(-1, vocab).clone().requires_grad_(True)
    loss = sf.reference_replay_kl(z, eye, case.teacher_ids, case.teacher_logprobs.double(), mode=mode,
                                  reduction="sum")
    loss.backward()
    q = torch.softmax(z.detach(), -1)
    ids = case.teacher_ids
    valid = ids >= 0
    in_t = torch.zeros_like(q, dtype=torch.bool)
    for n, i in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        if valid[n, i]:
            in_t[n, ids[n, i]] = True
    p_full = torch.zeros_like(q)
    p_full[in_t] = 0  # filled below
    for n, i in itertools.product(range(ids.shape[0]), range(ids.shape[1])):
        if valid[n, i]:
            p_full[n, ids[n, i]] = case.teacher_logprobs[n, i].double().exp()
    if mode == "tail":
        big_q = (q * in_t).sum(-1, keepdim=True)
        r = (1 - p_full.sum(-1, keepdim=True)).clamp(0, 1)
        c = (1 - r - big_q) / (1 - big_q)
        expected = torch.where(in_t, q - p_full, c * q)
    elif mode == "sampled":  # = q - w on rows with samples (their frequencies sum to 1)
        expected = p_full.sum(-1, keepdim=True) * q - p_full
    else:
        q_hat = q * in_t / (q * in_t).sum(-1, keepdim=True)
        p_hat = p_full / p_full.sum(-1, keepdim=True)
        expected = torch.where(in_t, q_hat - p_hat, 0.0)
        expected = torch.where(valid.any(-1, keepdim=True), expected, 0.0)
    torch.testing.assert_close(z.grad, expected, rtol=1e-10, atol=1e-12)


# --- fused implementations against the reference ---------------------------------------------------

SHAPES = [  # (lead, D, V, k)
    ((1,), 4, 1, 1),
    ((5,), 8, 37, 1),
    ((3, 7), 16, 37, 5),
    ((2, 3), 5, 300, 17),
    ((13,), 12, 61, 61),  # k = V
    ((4, 1, 3), 7, 129, 128),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_idx", range(len(SHAPES)))
def test_fp32_matches_reference(impl, mode, shape_idx):
    lead, dim, vocab, k = SHAPES[shape_idx]
    seed = 100 * shape_idx + MODES.index(mode)
    reduction = ["mean", "sum", "none"][(shape_idx + MODES.index(mode)) % 3]
    case = make_case(lead, dim, vocab, k, mode, seed=seed, temperature=[1.0, 0.7, 1.9][shape_idx % 3],
                     bias=shape_idx % 2 == 0, with_tail=(mode == "tail" and shape_idx % 2 == 1))
    chunk = [None, 2, 5][shape_idx % 3]
    for device in DEVICES:
        if impl == "triton" and device == "cpu" and "cuda" in DEVICES:
            continue  # with a GPU, Triton runs there (the interpreter is off)
        assert_close_to_reference(case, impl, torch.float32, 1e-4, reduction, device, chunk_size=chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", MODES)
def test_peaked_softmax_fp32(impl, reduction, mode):
    """Peaked student and teacher (CCE-style): most rows put almost all mass on one token, so the
    complement log-mass log(1 - Q) is tiny and must come from a log-sum-exp over the complement."""
    case = make_case((9,), 16, 53, 3, mode, seed=11, logit_scale=40.0, teacher_scale=8.0)
    assert_close_to_reference(case, impl, torch.float32, 1e-4, reduction, chunk_size=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_student_tail_mass_is_finite_and_exact(impl):
    """Teacher leaves 10% outside its slots, the student about 1e-30: huge but exact tail gradient."""
    vocab = 6
    z = torch.tensor([[80.0, 70.0, 0.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.6), math.log(0.3)]], dtype=torch.float32)
    eye = torch.eye(vocab, dtype=torch.float64)
    losses = []
    for dtype, fn, kw in [(torch.float64, sf.reference_replay_kl, {}), (torch.float32, sf.fused_replay_kl, {"impl": impl})]:
        dev = device_for(kw.get("impl", "reference"))
        h = z.to(dev, dtype, copy=True).requires_grad_(True)
        loss = fn(h, eye.to(dev, dtype), ids.to(dev), lp.to(dev), reduction="sum", **kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
        losses.append((loss.detach().double(), h.grad.double()))
    (ref_loss, ref_grad), (loss, grad) = losses
    assert ref_loss.item() > 5.0  # 0.1 * (log 0.1 - log 1e-30): the tail term dominates
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_within_documented_tolerance(impl, mode):
    case = make_case((4, 5), 32, 97, 8, mode, seed=21)
    assert_close_to_reference(case, impl, torch.bfloat16, 2e-2, "mean", chunk_size=6)


@pytest.mark.parametrize("mode", MODES)
def test_low_precision_gradient_matmuls(mode):
    """The CUDA arithmetic for 16-bit heads (16-bit operands for the gradient matmuls, weight
    gradient accumulated across chunks in bf16), exercised on the CPU."""
    case = make_case((24,), 32, 97, 8, mode, seed=22)

    def low_precision_kl(*args, **kwargs):
        return rk._apply(prepare_replay_kl_inputs(*args, **kwargs), "torch", 5, low_precision=True)

    got = run(low_precision_kl, case, torch.bfloat16, "cpu", "mean")
    ref = run(sf.reference_replay_kl, case, torch.float64)
    for a, e in zip(got, ref):
        assert rel_err(a, e) <= 2e-2


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_is_exact(impl):
    case = make_case((3, 5), 6, 23, 4, "tail", seed=31)
    assert_close_to_reference(case, impl, torch.float64, 1e-10, "sum", chunk_size=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_fp32_hidden_fp64_weight(impl):
    """float64 logits (promoted from an fp64 weight) with fp32 per-row terms: every pass must get
    its per-row scalars in the logits' dtype (the Triton pass used to reject fp32 sign/shift)."""
    case = make_case((3, 5), 6, 23, 4, "tail", seed=32, temperature=0.8)
    dev = device_for(impl)
    h = case.hidden.to(dev, torch.float32, copy=True).requires_grad_(True)
    w = case.weight.to(dev, torch.float64, copy=True).requires_grad_(True)
    ids, lp, kw = case.teacher(dev)
    loss = sf.fused_replay_kl(h, w, ids, lp, impl=impl, chunk_size=4, **kw)
    loss.backward()
    ref_h, ref_w, _ = case.leaves(torch.float64)
    ref = sf.reference_replay_kl(ref_h, ref_w, *case.teacher()[:2], **case.teacher()[2])
    ref.backward()
    for got, expected in [(loss, ref), (h.grad, ref_h.grad), (w.grad, ref_w.grad)]:
        assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_ids_and_all_masked_mean_is_zero(impl):
    case = make_case((4,), 6, 19, 3, "tail", seed=41, id_dtype=torch.int32, mask=False)
    dev = device_for(impl)
    h, w, b = case.leaves(torch.float32, dev)
    ids, lp, none_counts = case.teacher_ids.to(dev), case.teacher_logprobs.to(dev), torch.zeros(4, dtype=torch.bool, device=dev)
    loss = sf.fused_replay_kl(h, w, ids, lp, bias=b, impl=impl, mask=none_counts)
    assert loss.item() == 0.0
    loss.backward()
    assert h.grad.abs().max().item() == 0 and w.grad.abs().max().item() == 0
    none = sf.fused_replay_kl(h, w, ids, lp, bias=b, impl=impl, mask=none_counts, reduction="none")
    assert none.shape == (4,) and none.abs().max().item() == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_computes_no_weight_gradient(impl, monkeypatch):
    case = make_case((6,), 8, 41, 4, "tail", seed=51)

    def forbidden(*args, **kwargs):
        raise AssertionError("weight gradient computed for a frozen weight")

    monkeypatch.setattr(rk._HeadMatmuls, "accumulate_grad_weight", forbidden)
    h, w, _ = case.leaves(torch.float32, device_for(impl), weight_grad=False)
    ids, lp, kw = case.teacher(device_for(impl))
    sf.fused_replay_kl(h, w, ids, lp, impl=impl, **kw).backward()
    assert w.grad is None and h.grad is not None
    ids, lp, kw = case.teacher()
    ref_h = case.hidden.float().clone().requires_grad_(True)
    sf.reference_replay_kl(ref_h, case.weight, ids, lp, **kw).backward()
    assert rel_err(h.grad, ref_h.grad) <= 1e-4


def test_no_more_than_chunk_rows_of_logits(monkeypatch):
    case = make_case((11,), 8, 41, 4, "tail", seed=61)
    seen = []
    original = rk._HeadMatmuls.logits

    def recording(self, h):
        out = original(self, h)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(rk._HeadMatmuls, "logits", recording)
    run(sf.fused_replay_kl, case, torch.float32, impl="torch", chunk_size=3, reduction="none")
    # 4 chunks in forward, 4 again in backward (reduction="none" recomputes), none above 3 rows
    assert seen == [(3, 41), (3, 41), (3, 41), (2, 41)] * 2


def test_teacher_gets_no_gradient_and_autocast_works():
    case = make_case((5,), 8, 29, 4, "tail", seed=71)
    h, w, b = case.leaves(torch.float32)
    lp = case.teacher_logprobs.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sf.fused_replay_kl(h, w, case.teacher_ids, lp, bias=b, mask=case.mask)
    loss.backward()
    assert lp.grad is None
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    ref_h, ref_w, ref_b = case.leaves(torch.float64)
    ref = sf.reference_replay_kl(ref_h, ref_w, case.teacher_ids, case.teacher_logprobs, bias=ref_b, mask=case.mask)
    ref.backward()
    for got, expected in [(loss, ref), (h.grad, ref_h.grad), (w.grad, ref_w.grad), (b.grad, ref_b.grad)]:
        assert rel_err(got, expected) <= 2e-2


# --- bad input -------------------------------------------------------------------------------------


def _good():
    case = make_case((2, 3), 4, 11, 3, "tail", seed=81, unused_slots=False, mask=False, bias=False)
    return dict(hidden=case.hidden.float(), weight=case.weight.float(), teacher_ids=case.teacher_ids,
                teacher_logprobs=case.teacher_logprobs)


def _call(fn=None, **over):
    args = _good()
    kw = {}
    for key, value in over.items():
        (args if key in args else kw)[key] = value
    fn = fn or sf.fused_replay_kl
    return fn(args["hidden"], args["weight"], args["teacher_ids"], args["teacher_logprobs"], **kw)


BAD = [
    ("leading shape", dict(teacher_ids=torch.zeros(2, 4, 3, dtype=torch.long)), ValueError, "teacher_ids"),
    ("logprob shape", dict(teacher_logprobs=torch.zeros(2, 3, 2)), ValueError, "teacher_logprobs"),
    ("D mismatch", dict(weight=torch.zeros(11, 5)), ValueError, "weight"),
    ("k = 0", dict(teacher_ids=torch.zeros(2, 3, 0, dtype=torch.long), teacher_logprobs=torch.zeros(2, 3, 0)),
     ValueError, "k >= 1"),
    ("id >= V", dict(teacher_ids=torch.full((2, 3, 3), 11)), ValueError, "teacher_ids"),
    ("id < -1", dict(teacher_ids=torch.full((2, 3, 3), -2)), ValueError, "teacher_ids"),
    ("duplicate", dict(teacher_ids=torch.tensor([1, 1, 2]).expand(2, 3, 3)), ValueError, "duplicate"),
    ("nan logprob", dict(teacher_logprobs=torch.full((2, 3, 3), float("nan"))), ValueError, "finite"),
    ("inf logprob", dict(teacher_logprobs=torch.full((2, 3, 3), float("-inf"))), ValueError, "finite"),
    ("mass > 1", dict(teacher_logprobs=torch.full((2, 3, 3), -0.5)), ValueError, "at most 1"),
    ("int hidden", dict(hidden=torch.zeros(2, 3, 4, dtype=torch.long)), TypeError, "hidden"),
    ("float ids", dict(teacher_ids=torch.zeros(2, 3, 3)), TypeError, "teacher_ids"),
    ("mixed devices", dict(weight=torch.zeros(11, 4, device="meta")), ValueError, "device"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", dict(temperature=-1.0), ValueError, "temperature"),
    ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature"),
    ("mode", dict(mode="full"), ValueError, "mode"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("impl", dict(impl="cuda"), ValueError, "impl"),
    ("mask dtype", dict(mask=torch.ones(2, 3)), TypeError, "mask"),
    ("mask shape", dict(mask=torch.ones(3, dtype=torch.bool)), ValueError, "mask"),
    ("bias shape", dict(bias=torch.zeros(10)), ValueError, "bias"),
    ("chunk_size", dict(chunk_size=0), ValueError, "chunk_size"),
    ("tail with topk", dict(mode="topk", teacher_tail_logprob=torch.zeros(2, 3)), ValueError, "teacher_tail_logprob"),
    ("tail nan", dict(teacher_tail_logprob=torch.full((2, 3), float("nan"))), ValueError, "teacher_tail_logprob"),
    # slots 0.5 + tail 0.1: a teacher that leaves 40% of its mass nowhere (KL would go negative)
    ("slots + tail < 1", dict(teacher_logprobs=torch.full((2, 3, 3), math.log(0.5 / 3)),
                              teacher_tail_logprob=torch.full((2, 3), math.log(0.1))),
     ValueError, "teacher_logprobs and teacher_tail_logprob"),
    ("slots + tail > 1", dict(teacher_logprobs=torch.full((2, 3, 3), math.log(0.9 / 3)),
                              teacher_tail_logprob=torch.full((2, 3), math.log(0.9))),
     ValueError, "teacher_logprobs and teacher_tail_logprob"),
]


@pytest.mark.parametrize("fn", [sf.fused_replay_kl, sf.reference_replay_kl], ids=["fused", "reference"])
@pytest.mark.parametrize("name,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_rejected(fn, name, over, exc, match):
    with pytest.raises(exc, match=match):
        _call(fn, **over)


def test_slots_plus_tail_within_the_tolerance_of_one_pass():
    """The tolerance is MASS_TOLERANCE (shared with ReplayBuffer.validate) on either side of 1; masked
    positions are not checked; without a tail only the upper bound applies (a top-k cache alone
    leaves its tail unknown)."""
    from selfreplay_fast.replay_buffer import MASS_TOLERANCE

    slots = torch.full((2, 3, 3), math.log(0.6 / 3))
    for total in (1 - 0.9 * MASS_TOLERANCE, 1 + 0.9 * MASS_TOLERANCE):
        assert torch.isfinite(_call(teacher_logprobs=slots, teacher_tail_logprob=torch.full((2, 3), math.log(total - 0.6))))
    for total in (1 - 1.5 * MASS_TOLERANCE, 1 + 1.5 * MASS_TOLERANCE):
        with pytest.raises(ValueError, match="teacher_logprobs and teacher_tail_logprob"):
            _call(teacher_logprobs=slots, teacher_tail_logprob=torch.full((2, 3), math.log(total - 0.6)))
    short = torch.full((2, 3), math.log(0.1))
    mask = torch.tensor([[True, False, False], [False, False, False]])
    short[0, 0] = math.log(0.4)  # the one counted position sums to 1
    assert torch.isfinite(_call(teacher_logprobs=slots, teacher_tail_logprob=short, mask=mask))
    assert torch.isfinite(_call(teacher_logprobs=slots))  # no tail: mass 0.6 <= 1 is fine


def test_sampled_mass_over_one_and_good_call_pass():
    assert torch.isfinite(_call())  # the baseline of the table above is valid
    with pytest.raises(ValueError, match="sample frequencies"):
        _call(mode="sampled", teacher_logprobs=torch.full((2, 3, 3), -0.5))


@pytest.mark.parametrize("fn", [sf.fused_replay_kl, sf.reference_replay_kl], ids=["fused", "reference"])
def test_process_group_must_be_a_process_group(fn):
    with pytest.raises(TypeError, match="process_group"):
        _call(fn, process_group=object())


@pytest.mark.parametrize("mode", MODES)
def test_single_rank_process_group_matches_no_group(mode):
    """The vocab-parallel path with one rank holding the whole vocabulary (its collectives are
    no-ops); tests/test_vocab_parallel.py runs 2 and 3 ranks."""
    import torch.distributed as dist

    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)  # in-process: no init_process_group
    case = make_case((3, 4), 6, 13, 4, mode, seed=17, temperature=0.8)
    for fn in (sf.fused_replay_kl, sf.reference_replay_kl):
        expected = run(fn, case, torch.float64, reduction="none", impl="torch", chunk_size=5)
        got = run(fn, case, torch.float64, reduction="none", impl="torch", chunk_size=5, process_group=group)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _call(impl="triton")


def test_skip_value_checks_skips_only_value_checks():
    with sf.skip_value_checks():
        _call(teacher_ids=torch.tensor([1, 1, 2]).expand(2, 3, 3))  # duplicate not checked
        with pytest.raises(ValueError, match="weight"):
            _call(weight=torch.zeros(11, 5))
    with pytest.raises(ValueError, match="duplicate"):
        _call(teacher_ids=torch.tensor([1, 1, 2]).expand(2, 3, 3))


def test_tail_mode_is_a_lower_bound_exact_when_student_tail_has_teacher_shape():
    """Coarsening into (top-k + one bucket) can only lose information: tail KL <= full KL, with
    equality when the student's conditional distribution inside the bucket is the teacher's."""
    g = torch.Generator().manual_seed(91)
    vocab = 12
    teacher = torch.log_softmax(torch.randn(5, vocab, generator=g, dtype=torch.float64) * 2, -1)
    ids = teacher.topk(4, -1).indices
    lp, tail = teacher.gather(1, ids), log_mass_outside(teacher, ids)
    eye = torch.eye(vocab, dtype=torch.float64)
    outside = torch.ones_like(teacher, dtype=torch.bool).scatter(1, ids, False)
    shifted = teacher + torch.where(outside, 1.3, torch.randn(5, vocab, generator=g, dtype=torch.float64))
    for z, exact in [(shifted, True), (torch.randn(5, vocab, generator=g, dtype=torch.float64), False)]:
        full = F.kl_div(torch.log_softmax(z, -1), teacher, log_target=True, reduction="none").sum(-1)
        got = sf.fused_replay_kl(z, eye, ids, lp, teacher_tail_logprob=tail, reduction="none", impl="torch")
        if exact:
            torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)
        else:
            assert (got <= full + 1e-12).all() and (got < full - 1e-3).any()


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
def test_no_gradient_work_with_autograd_off(grad_off, monkeypatch):
    """Evaluation under no_grad must not run the gradient matmuls (they happen during forward)."""
    case = make_case((6,), 8, 41, 4, "tail", seed=52)

    def forbidden(*args, **kwargs):
        raise AssertionError("gradient work with autograd off")

    monkeypatch.setattr(rk._HeadMatmuls, "accumulate_grad_weight", forbidden)
    monkeypatch.setattr(rk._HeadMatmuls, "grad_hidden", forbidden)
    h, w, b = case.leaves(torch.float32)
    ids, lp, kw = case.teacher()
    with grad_off():
        loss = sf.fused_replay_kl(h, w, ids, lp, bias=b, impl="torch", **kw)
    expected = sf.reference_replay_kl(case.hidden, case.weight, ids, lp, bias=case.bias, **kw)
    assert not loss.requires_grad and rel_err(loss, expected) <= 1e-4


def test_fp32_master_weight_gradient_accumulates_in_fp32(monkeypatch):
    """16-bit matmuls (autocast) with an fp32 lm_head: the weight gradient's running sum over chunks is
    kept in fp32 (never rounded to bf16 between chunks), in vocabulary blocks."""
    monkeypatch.setattr(rk, "_GRAD_WEIGHT_BLOCK_ROWS", 16)  # several blocks at V = 97
    case = make_case((48,), 32, 97, 8, "tail", seed=23)
    seen = []
    original = rk._HeadMatmuls.accumulate_grad_weight

    def spy(self, acc, grad_logits, hidden_chunk):
        seen.append((acc.dtype, grad_logits.dtype))
        return original(self, acc, grad_logits, hidden_chunk)

    monkeypatch.setattr(rk._HeadMatmuls, "accumulate_grad_weight", spy)

    def autocast_low_precision_kl(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rk._apply(prepare_replay_kl_inputs(*args, **kwargs), "torch", 4, low_precision=True)

    got = run(autocast_low_precision_kl, case, torch.float32, "cpu", "sum")
    ref = run(sf.reference_replay_kl, case, torch.float64, "cpu", "sum")
    assert seen and all(acc == torch.float32 and g == torch.bfloat16 for acc, g in seen)
    assert got[2].dtype == torch.float32
    for a, e in zip(got, ref):
        assert rel_err(a, e) <= 2e-2


def test_fp16_gradients_are_formed_after_the_loss_scale():
    """fp16 operands: gradients formed in forward (before GradScaler's grad_output arrives, already
    divided by the token count) lose precision as N grows; they are recomputed in backward instead.
    Measured at N = 32768 before the fix: grad_hidden 8e-3, grad_bias 1.9e-2 relative error."""
    case = make_case((32768,), 32, 97, 8, "tail", seed=5, mask=False)
    h, w, b = case.leaves(torch.float16)
    ids, lp, kw = case.teacher()
    loss = rk._apply(prepare_replay_kl_inputs(h, w, ids, lp, bias=b, **kw), "torch", 1024, low_precision=True)
    (loss * 1024.0).backward()  # the loss scale of a GradScaler
    rh, rw, rb = case.leaves(torch.float64)
    (sf.reference_replay_kl(rh, rw, ids, lp, bias=rb, **kw) * 1024.0).backward()
    for got, expected in ((h.grad, rh.grad), (w.grad, rw.grad), (b.grad, rb.grad)):
        assert rel_err(got, expected) <= 2e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("touch_row_zero", [False, True])
def test_add_rows_sums_duplicates_before_rounding(device, touch_row_zero):
    """The topk-mode weight gradient of a 16-bit head: each touched row is rounded once per call, not
    once per duplicate (16-bit atomics, as CUDA's index_add_ uses, stall when one token is in the
    top-k of thousands of rows). Terms with a positive mean make the running sum outgrow each term."""
    g = torch.Generator().manual_seed(8)
    vocab, dim, m = 50, 16, 20000
    acc = torch.randn(vocab, dim, generator=g).to(torch.bfloat16)
    low = 0 if touch_row_zero else 1
    ids = torch.randint(low, 6, (m,), generator=g)  # few distinct rows, thousands of duplicates each
    values = torch.rand(m, dim, generator=g) * 0.02
    sums = torch.zeros(vocab, dim, dtype=torch.float64).index_add_(0, ids, values.double())
    expected = acc.double() + sums
    got = acc.to(device)
    rk._add_rows(got, ids.to(device), values.to(device))
    got = got.cpu()
    assert got.dtype == torch.bfloat16
    # The sum rounded to bf16, then added to acc with one more rounding: each within half a bf16 ulp
    # (2^-9 relative) of its operands. A per-duplicate 16-bit running sum misses by about the sum itself.
    assert ((got.double() - expected).abs() <= (acc.double().abs() + sums.abs()) * 2.0 ** -8).all()
    untouched = torch.ones(vocab, dtype=torch.bool)
    untouched[ids.unique()] = False
    assert torch.equal(got[untouched], acc[untouched])  # rows no id names are left exactly as they were


@pytest.mark.parametrize("device", DEVICES)
def test_topk_mode_frequent_tokens_16bit_weight_gradient(device):
    """Every row's top-k names the same few tokens (as frequent tokens are in real caches): the bf16
    weight gradient of the 16-bit CUDA arithmetic stays within the bf16 tolerance at N = 8192."""
    case = make_case((8192,), 32, 97, 8, "topk", seed=12, mask=False, unused_slots=False)
    case.teacher_ids = case.teacher_ids[:1].expand(8192, 8).contiguous()

    def low_precision_kl(*args, **kwargs):
        return rk._apply(prepare_replay_kl_inputs(*args, **kwargs), "torch", 4096, low_precision=True)

    got = run(low_precision_kl, case, torch.bfloat16, device, "mean")
    ref = run(sf.reference_replay_kl, case, torch.float64)
    assert got[2].dtype == torch.bfloat16
    for a, e in zip(got, ref):
        assert rel_err(a, e) <= 2e-2


def test_fp32_hidden_with_16bit_cuda_weight_warns_of_the_weight_copy():
    """fp32 hidden, a 16-bit CUDA weight, no autocast: a warning naming the copy's size and the fix. A
    stand-in reports a CUDA device (only the weight's device, dtype and size are read)."""
    h32 = torch.empty(2, 4, dtype=torch.float32)
    w16 = torch.empty(8, 4, dtype=torch.bfloat16)

    class _Cuda:
        device = torch.device("cuda")
        dtype = torch.bfloat16

        def numel(self):
            return 256 * 2**20 // 4

    with pytest.warns(UserWarning, match=r"fp32 copy of the weight \(256 MiB per call\).*autocast"):
        rk._warn_if_weight_upcast(h32, _Cuda(), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk._warn_if_weight_upcast(h32, w16, torch.float32)  # CPU: the fp32 copy is the CPU path's design
        rk._warn_if_weight_upcast(h32.bfloat16(), _Cuda(), torch.bfloat16)  # 16-bit matmuls: no copy


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_output_scales_16bit_gradients_in_fp32(impl):
    """The 16-bit gradients formed in forward are scaled by backward's grad_output with the product in
    fp32, rounded once to bf16. Rounding grad_output (here 1/3, e.g. a replay weight or 1 / accumulation
    steps) to bf16 first was a scale error of up to 2^-9 on every element."""
    case = make_case((40,), 32, 97, 8, "tail", seed=24)

    def grads(scale):
        h, w, b = case.leaves(torch.bfloat16)
        ids, lp, kw = case.teacher()
        loss = rk._apply(prepare_replay_kl_inputs(h, w, ids, lp, bias=b, **kw), impl, 16, low_precision=True)
        (loss * scale if scale != 1 else loss).backward()
        assert h.grad.dtype == w.grad.dtype == torch.bfloat16
        return h.grad, w.grad

    unscaled, scaled = grads(1), grads(1 / 3)
    third = torch.tensor(1 / 3, dtype=torch.float32)
    for got, once in zip(scaled, unscaled):
        assert torch.equal(got, (once.float() * third).to(torch.bfloat16))


def test_16bit_hidden_with_fp32_cuda_weight_warns_of_fp32_matmuls():
    """bf16 hidden, an fp32 lm_head on CUDA, no autocast: torch's promotion runs the three head matmuls in
    fp32, far below the 16-bit tensor-core rate; say so, with the fix (autocast or a 16-bit head)."""
    h16 = torch.empty(2, 4, dtype=torch.bfloat16)

    class _Cuda:
        device = torch.device("cuda")
        dtype = torch.float32

        def numel(self):
            return 256 * 2**20 // 4

    with pytest.warns(UserWarning, match=r"fp32 matmuls.*autocast"):
        rk._warn_if_weight_upcast(h16, _Cuda(), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk._warn_if_weight_upcast(h16, torch.empty(8, 4), torch.float32)  # CPU: fp32 is the CPU path's design
        rk._warn_if_weight_upcast(h16, _Cuda(), torch.bfloat16)  # under autocast: 16-bit matmuls
