"""Property-based fuzzing of fused_replay_kl (hypothesis): every impl, mode and reduction.

Valid problems: odd shapes (V and D from 1, k up to V, chunks of any size), extreme logits, tiny and
huge temperatures, masks, padded slots (-1) and exact tails. The loss and every gradient must match
the float64 reference (``reference_replay_kl``) within the documented fp32 tolerance, NaN exactly
where it is NaN. Two regimes keep that comparison about the algorithm, not about rounding the inputs:

* exact: hidden, weight and bias on a coarse binary grid and a power-of-2 temperature, so the fp32
  scaled logits equal the float64 ones bit for bit, however large (z up to ~1e10), often with a tie at
  the top (q = 1/2 each even at T = 2^-26);
* general: arbitrary fp32 inputs and temperatures with |z| <= 200 (fp32 rounding of z itself, which
  no fp32 implementation can avoid, then stays below the tolerance).

Invalid problems: one corruption of a valid call; it must raise TypeError/ValueError naming the
argument. ``derandomize=True`` keeps CI deterministic; the Triton interpreter is slow, so it gets
fewer examples.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfreplay_fast as sf

from conftest import device_for
from replay_cases import Case, log_mass_outside, run

MODES = ["tail", "sampled", "topk"]
REDUCTIONS = ["mean", "sum", "none"]
TOL = 1e-4  # docs/design.md, section 5: fp32 inputs

FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_problems(draw):
    mode = draw(st.sampled_from(MODES))
    lead = draw(st.sampled_from([(1,), (2,), (5,), (2, 3), (3, 1, 2)]))
    n = math.prod(lead)
    dim = draw(st.integers(1, 6))
    vocab = draw(st.integers(1, 40))
    k = draw(st.one_of(st.integers(1, min(vocab, 6)), st.just(vocab)))
    exact = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    with_bias = draw(st.booleans())
    if exact:
        # Products of 4-bit integers times a power of 2, summed over D <= 6: exact in fp32.
        scale = 2.0 ** draw(st.integers(-6, 6))
        temperature = 2.0 ** draw(st.sampled_from([-26, -23, -20, -16, -12, -8, -5, -2, 0, 1, 4, 10, 20]))
        hidden = torch.randint(-8, 9, (n, dim), generator=g).double() / 8
        weight = torch.randint(-8, 9, (vocab, dim), generator=g).double() * (scale / 8)
        bias = torch.randint(-64, 65, (vocab,), generator=g).double() * (scale / 64) if with_bias else None
        if vocab > 1 and draw(st.booleans()):
            # A tie with the top logit of position 0: q = 1/2 each, however small T is.
            top = int((hidden[0] @ weight.T + (bias if bias is not None else 0)).argmax())
            twin = (top + 1 + int(torch.randint(vocab - 1, (), generator=g))) % vocab
            weight[twin] = weight[top]
            if bias is not None:
                bias[twin] = bias[top]
    else:
        temperature = draw(st.floats(1e-3, 1e3))
        z_max = draw(st.floats(1e-3, 200.0))  # the largest |scaled logit|, roughly
        hidden = torch.randn(n, dim, generator=g, dtype=torch.float64)
        weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        bias = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
        x_max = (hidden @ weight.T + (bias if bias is not None else 0)).abs().max().clamp_min(1e-30)
        weight, bias = (t * (z_max * temperature / x_max) if t is not None else None for t in (weight, bias))
        # Round to fp32 here: the reference sees exactly the fused implementation's inputs.
        hidden, weight = hidden.float().double(), weight.float().double()
        bias = bias.float().double() if bias is not None else None

    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * draw(st.floats(0.1, 10.0)), -1)
    if mode == "sampled":
        draws = torch.multinomial(teacher.exp(), 3 * k, replacement=True, generator=g)
        counts = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        top = counts.topk(k, dim=-1)
        ids = torch.where(top.values > 0, top.indices, -1)
    else:
        ids = teacher.topk(k, dim=-1).indices
    ids = ids.gather(1, torch.argsort(torch.rand(n, k, generator=g), dim=-1))  # slot order must not matter
    drop_rate = draw(st.sampled_from([0.0, 0.3, 1.0]))
    ids = torch.where(torch.rand(n, k, generator=g) < drop_rate, -1, ids)  # padded slots
    if mode == "sampled":
        freq = torch.where(ids >= 0, counts.gather(1, ids.clamp_min(0)), 0.0)
        logprobs = (freq / freq.sum(-1, keepdim=True).clamp_min(1)).log()
    else:
        logprobs = teacher.gather(1, ids.clamp_min(0))
    logprobs = torch.where(ids >= 0, logprobs, float("nan"))  # unused slots hold garbage
    tail = None
    if mode == "tail" and draw(st.booleans()):
        tail = log_mass_outside(teacher, ids).float().reshape(lead)
    mask = None
    if draw(st.booleans()):
        mask = (torch.rand(lead, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.9]))).reshape(lead)
    case = Case(
        hidden=hidden.reshape(*lead, dim), weight=weight, bias=bias,
        teacher_ids=ids.reshape(*lead, k), teacher_logprobs=logprobs.float().reshape(*lead, k),
        mask=mask, teacher_tail_logprob=tail, mode=mode, temperature=temperature,
    )
    reduction = draw(st.sampled_from(REDUCTIONS))
    chunk_size = draw(st.one_of(st.none(), st.integers(1, n)))
    return case, reduction, chunk_size


def _check_against_reference(impl, problem):
    case, reduction, chunk_size = problem
    ref = run(sf.reference_replay_kl, case, torch.float64, "cpu", reduction)
    got = run(sf.fused_replay_kl, case, torch.float32, device_for(impl), reduction, impl=impl, chunk_size=chunk_size)
    for name, a, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], got, ref):
        if e is None:
            assert a is None, name
            continue
        a, e = a.double().cpu(), e.double()
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{name}: NaN at other places than the reference"
        finite = ~torch.isnan(e)
        assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: inf at other places than the reference"
        finite &= ~torch.isinf(e)
        a, e = a[finite], e[finite]
        if e.numel() == 0:
            continue
        # Norm-wise relative error, with an absolute floor at the fp32 rounding of the terms (each
        # within a few ulps of its own size): a sum that cancels (a KL near 0 when p = q; dL/dx summing
        # to about 0 over tied rows of W, amplified by 1/T) is only that accurate in any fp32 code.
        floor = 1e-6 * (_loss_scale(case) if name == "loss" else _gradient_scale(case))
        err = (a - e).norm().item() / max(e.norm().item(), floor / TOL)
        assert err <= TOL, f"{name}: relative error {err:.2e} > {TOL:.0e} (T = {case.temperature:g})"


def _loss_scale(case):
    """The size of a row's terms p (lp - log q), times sqrt(rows): (1 + max |lp| + max |z|) sqrt(N)."""
    hidden = case.hidden.reshape(-1, case.hidden.shape[-1])
    logits = hidden @ case.weight.T + (case.bias if case.bias is not None else 0)
    lp = torch.where(case.teacher_ids >= 0, case.teacher_logprobs.double(), 0.0)
    rows = hidden.shape[0]
    return float(1 + lp.abs().max() + logits.abs().max() / case.temperature) * math.sqrt(rows)


def _gradient_scale(case):
    """A bound on the size of a gradient entry: |dL/dx| <= 2 / T per row, times max |h| or |W| (or 1
    for the bias), times sqrt(rows) for the norm over rows."""
    size = 1 + case.hidden.abs().max() + case.weight.abs().max()
    rows = case.hidden.reshape(-1, case.hidden.shape[-1]).shape[0]
    return float(size) * math.sqrt(rows) / case.temperature


@settings(max_examples=150, **FUZZ)
@given(valid_problems())
def test_fuzz_torch_matches_reference(problem):
    _check_against_reference("torch", problem)


@settings(max_examples=40, **FUZZ)
@given(valid_problems())
def test_fuzz_triton_matches_reference(problem):
    _check_against_reference("triton", problem)


# --- invalid input: one corruption of a valid call ---------------------------------------------------


def _base_call(mode):
    g = torch.Generator().manual_seed(7)
    n, dim, vocab, k = 4, 3, 9, 3
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64), -1)
    ids = teacher.topk(k, -1).indices
    args = dict(
        hidden=torch.randn(2, 2, dim, generator=g), weight=torch.randn(vocab, dim, generator=g),
        teacher_ids=ids.reshape(2, 2, k), teacher_logprobs=teacher.gather(1, ids).float().reshape(2, 2, k),
    )
    kwargs = dict(mode=mode, bias=torch.zeros(vocab), mask=torch.ones(2, 2, dtype=torch.bool))
    if mode == "tail":
        kwargs["teacher_tail_logprob"] = log_mass_outside(teacher, ids).float().reshape(2, 2)
    if mode == "sampled":
        args["teacher_logprobs"] = torch.full((2, 2, k), -math.log(k))
    return args, kwargs


def _set_slot(name, value):
    def corrupt(args, kwargs):
        t = args[name].clone()
        t[1, 0, 1] = value
        args[name] = t
    return corrupt


def _replace(name, value):
    def corrupt(args, kwargs):
        (args if name in args else kwargs)[name] = value
    return corrupt


def _scale_tail(factor):
    def corrupt(args, kwargs):
        kwargs["teacher_tail_logprob"] = kwargs["teacher_tail_logprob"] + math.log(factor)
    return corrupt


def _duplicate_id(args, kwargs):
    t = args["teacher_ids"].clone()
    t[0, 1, 2] = t[0, 1, 0]
    args["teacher_ids"] = t


def _excess_mass(args, kwargs):
    args["teacher_logprobs"] = torch.full_like(args["teacher_logprobs"], -0.5)
    kwargs.pop("teacher_tail_logprob", None)


# (corruption, modes it applies to, argument the error must name)
CORRUPTIONS = [
    (_set_slot("teacher_ids", 9), MODES, "teacher_ids"),
    (_set_slot("teacher_ids", -2), MODES, "teacher_ids"),
    (_duplicate_id, MODES, "teacher_ids"),
    (_set_slot("teacher_logprobs", float("nan")), MODES, "teacher_logprobs"),
    (_set_slot("teacher_logprobs", float("inf")), MODES, "teacher_logprobs"),
    (_set_slot("teacher_logprobs", float("-inf")), MODES, "teacher_logprobs"),
    (_excess_mass, ["tail", "sampled"], "teacher_logprobs"),
    (_scale_tail(0.3), ["tail"], "teacher_logprobs and teacher_tail_logprob"),
    (_scale_tail(3.0), ["tail"], "teacher_tail_logprob"),
    (_replace("teacher_tail_logprob", torch.full((2, 2), float("nan"))), ["tail"], "teacher_tail_logprob"),
    (_replace("teacher_tail_logprob", torch.zeros(2, 2)), ["topk", "sampled"], "teacher_tail_logprob"),
    (_replace("teacher_tail_logprob", torch.zeros(2, 3)), ["tail"], "teacher_tail_logprob"),
    (_replace("teacher_ids", torch.zeros(2, 3, 3, dtype=torch.long)), MODES, "teacher_ids"),
    (_replace("teacher_ids", torch.zeros(2, 2, 3)), MODES, "teacher_ids"),
    (_replace("teacher_logprobs", torch.zeros(2, 2, 4)), MODES, "teacher_logprobs"),
    (_replace("hidden", torch.zeros(2, 2, 3, dtype=torch.long)), MODES, "hidden"),
    (_replace("hidden", [[0.0]]), MODES, "hidden"),
    (_replace("weight", torch.zeros(9, 4)), MODES, "weight"),
    (_replace("weight", torch.zeros(9)), MODES, "weight"),
    (_replace("bias", torch.zeros(8)), MODES, "bias"),
    (_replace("mask", torch.ones(2, 2)), MODES, "mask"),
    (_replace("mask", torch.ones(4, dtype=torch.bool)), MODES, "mask"),
    (_replace("temperature", 0.0), MODES, "temperature"),
    (_replace("temperature", -2.0), MODES, "temperature"),
    (_replace("temperature", float("nan")), MODES, "temperature"),
    (_replace("temperature", float("inf")), MODES, "temperature"),
    (_replace("temperature", "1.0"), MODES, "temperature"),
    (_replace("temperature", True), MODES, "temperature"),
    (_replace("reduction", "mea"), MODES, "reduction"),
    (_replace("mode", "full"), MODES, "mode"),
    (_replace("impl", "cuda"), MODES, "impl"),
    (_replace("chunk_size", 0), MODES, "chunk_size"),
    (_replace("chunk_size", 2.5), MODES, "chunk_size"),
    (_replace("chunk_size", True), MODES, "chunk_size"),
    (_replace("process_group", "world"), MODES, "process_group"),
]


@st.composite
def invalid_calls(draw):
    index = draw(st.integers(0, len(CORRUPTIONS) - 1))
    corrupt, modes, name = CORRUPTIONS[index]
    mode = draw(st.sampled_from(modes))
    args, kwargs = _base_call(mode)
    kwargs["reduction"] = draw(st.sampled_from(REDUCTIONS))
    kwargs["impl"] = draw(st.sampled_from(["torch", "triton", "auto"]))
    corrupt(args, kwargs)
    return args, kwargs, name


def test_the_base_call_is_valid():
    for mode in MODES:
        args, kwargs = _base_call(mode)
        assert torch.isfinite(sf.fused_replay_kl(*args.values(), impl="torch", **kwargs))


@pytest.mark.parametrize("fn", [sf.fused_replay_kl, sf.reference_replay_kl], ids=["fused", "reference"])
@settings(max_examples=120, **FUZZ)
@given(call=invalid_calls())
def test_fuzz_invalid_input_names_the_argument(fn, call):
    args, kwargs, name = call
    try:
        fn(*args.values(), **kwargs)
    except (TypeError, ValueError) as exc:
        assert name in str(exc), f"expected the error to name {name!r}: {exc}"
    else:
        pytest.fail(f"no error for a corrupted {name}")
