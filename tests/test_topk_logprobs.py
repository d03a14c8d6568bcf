"""topk_logprobs / linear_topk_logprobs against torch.log_softmax + torch.topk and a float64 reference.

Every behavioural test runs twice: through the compiled extension ("extension", skipped when it was not
built) and through the pure-torch fallback ("fallback", forced by switching the module's extension
off). Both must give the same results.

Ties: torch.topk leaves the order of equal logits unspecified, so comparisons with it are tie-proof:
the log-prob *values* (which ties cannot change), the logits at the returned ids, and id *sets* only
for rows without a tie at the k-th value. The float64 reference in this file uses the library's
documented rule (among equal logits the lower id ranks first), and ids are compared with it exactly.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from selfreplay_fast import topk as topk_module
from selfreplay_fast.topk import extension_available, linear_topk_logprobs, topk_logprobs

NEG_INF = float("-inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IMPLS = ["extension", "fallback"]


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Which implementation topk_logprobs uses in this test."""
    if request.param == "extension":
        if not extension_available():
            pytest.skip("compiled extension not built")
    else:
        monkeypatch.setattr(topk_module, "_EXTENSION", None)
        monkeypatch.setattr(topk_module, "_fallback_warned", True)  # the warning has its own test
    return request.param


def reference(logits: torch.Tensor, k: int):
    """float64 top-k log-probs and tail, ties to the lower id (stable descending sort)."""
    x = logits.double()
    lse = torch.logsumexp(x, dim=-1)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    ids = order[:, :k]
    logprobs = x.gather(1, ids) - lse[:, None]
    tail = torch.logsumexp(x.scatter(1, ids, NEG_INF), dim=-1) - lse
    return ids, logprobs, tail


def assert_close_f32(got: torch.Tensor, want: torch.Tensor, atol: float = 2e-5, rtol: float = 2e-6):
    """Float32 outputs against float64 values: the reference is rounded to float32 first (so -6e38
    becomes -inf, as in the outputs); infinities and NaN must match exactly."""
    want = want.float()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)


def check_against_torch(logits: torch.Tensor, k: int, ids, logprobs, tail):
    """The tie-proof comparison with torch.log_softmax + torch.topk described in the module docstring."""
    n, vocab = logits.shape
    assert ids.shape == (n, k) and ids.dtype == torch.int32
    assert logprobs.shape == (n, k) and logprobs.dtype == torch.float32
    assert tail.shape == (n,) and tail.dtype == torch.float32
    x = logits.float()
    torch.testing.assert_close(logprobs, torch.log_softmax(x, dim=-1).topk(k, dim=-1).values, atol=2e-5, rtol=2e-6)
    # Ids from the logits themselves: with 1e30-scale logits many log-probs round to the same float.
    torch_ids = x.topk(k, dim=-1).indices
    ids64 = ids.long()
    assert ((ids64 >= 0) & (ids64 < vocab)).all()
    assert (ids64.sort(dim=-1).values.diff(dim=-1) != 0).all(), "ids repeat within a row"
    # The logits at our ids are torch's top-k logits, in order: our ids are a valid top k.
    torch.testing.assert_close(x.gather(1, ids64), x.gather(1, torch_ids), atol=0, rtol=0)
    # Rows without a tie at the k-th value have a unique top-k set.
    kth = x.gather(1, torch_ids[:, -1:])
    untied = (x == kth).sum(dim=-1) == 1
    assert torch.equal(ids64[untied].sort(dim=-1).values, torch_ids[untied].sort(dim=-1).values)


def check_against_reference(logits: torch.Tensor, k: int, ids, logprobs, tail):
    want_ids, want_logprobs, want_tail = reference(logits, k)
    assert torch.equal(ids.long(), want_ids)
    assert_close_f32(logprobs, want_logprobs)
    assert_close_f32(tail, want_tail, atol=2e-5, rtol=1e-5)


def random_logits(n, vocab, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------------
# Agreement with torch and with the float64 reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(1, 1), (1, 5), (7, 97), (33, 1000), (3, 4099)])
def test_matches_torch_and_reference(impl, dtype, n, vocab):
    logits = random_logits(n, vocab, dtype, seed=n * vocab)
    for k in sorted({1, 2, 64, vocab // 2, vocab - 1, vocab} & set(range(1, vocab + 1))):
        ids, logprobs, tail = topk_logprobs(logits, k)
        check_against_torch(logits, k, ids, logprobs, tail)
        check_against_reference(logits, k, ids, logprobs, tail)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_k_from_1_to_vocab(impl, dtype):
    vocab = 19
    logits = random_logits(5, vocab, dtype, seed=19)
    for k in range(1, vocab + 1):
        ids, logprobs, tail = topk_logprobs(logits, k)
        check_against_torch(logits, k, ids, logprobs, tail)
        check_against_reference(logits, k, ids, logprobs, tail)
        if k == vocab:
            assert torch.all(tail == NEG_INF), "no tail mass when k == V"


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_vocabulary(impl, dtype):
    logits = random_logits(3, 256_000, dtype, scale=2.0, seed=256)
    ids, logprobs, tail = topk_logprobs(logits, 64)
    check_against_torch(logits, 64, ids, logprobs, tail)
    check_against_reference(logits, 64, ids, logprobs, tail)


def test_zero_rows(impl):
    ids, logprobs, tail = topk_logprobs(torch.empty(0, 10), 3)
    assert ids.shape == (0, 3) and logprobs.shape == (0, 3) and tail.shape == (0,)


# ---------------------------------------------------------------------------------------------------
# Ties, infinities, extreme values


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_the_lower_id(impl, dtype):
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (6, 300), generator=g).to(dtype)  # massive ties
    for k in (1, 5, 64, 150, 299, 300):
        ids, logprobs, tail = topk_logprobs(logits, k)
        check_against_torch(logits, k, ids, logprobs, tail)
        check_against_reference(logits, k, ids, logprobs, tail)
    ids, _, _ = topk_logprobs(torch.zeros(2, 50, dtype=dtype), 7)
    assert ids.tolist() == [list(range(7))] * 2


def extreme_rows(vocab=300, seed=11):
    """Rows with -inf entries, fewer finite entries than k, 1e30-scale logits and +-80 peaks."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(6, vocab, generator=g, dtype=torch.float64)
    rows[0, ::7] = NEG_INF  # scattered -inf entries
    rows[1] = NEG_INF  # only two finite logits: -inf entries fill the rest of the top k
    rows[1, 3], rows[1, 250] = 1.0, 2.0
    rows[2, 10], rows[2, 20], rows[2, 30], rows[2, 40] = 1e30, -1e30, 3e38, -3e38  # tail ~ e^-3e38
    rows[3, 0], rows[3, vocab - 1], rows[3, 100] = 80.0, -80.0, 79.5  # tail mass ~ e^-80
    rows[4] = -100.0  # everything far below zero
    rows[4, 123] = -99.0
    rows[5, 5] = 80.0  # one peak: the tail is most of the vocabulary at ~e^-80 each
    return rows


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_and_huge_logits(impl, dtype):
    rows = extreme_rows()
    if dtype != torch.float32:
        rows = rows[[0, 1, 3, 4, 5]]  # 1e30 and 3e38 are not representable in 16 bits
    logits = rows.to(dtype)
    for k in (1, 2, 5, 64, logits.shape[1] - 1, logits.shape[1]):
        ids, logprobs, tail = topk_logprobs(logits, k)
        check_against_reference(logits, k, ids, logprobs, tail)
        finite_rows = torch.isfinite(logits.float()).all(dim=-1)
        if finite_rows.any():  # torch.log_softmax is itself exact enough where every logit is finite
            check_against_torch(logits[finite_rows], k, ids[finite_rows], logprobs[finite_rows], tail[finite_rows])


def test_tail_against_float64_when_it_is_tiny(impl):
    """The tail is its own log-sum-exp: e^-160 of the mass must come out as about -160, not -inf."""
    logits = torch.zeros(2, 1000)
    logits[0, 0] = 160.0
    logits[1, :3] = torch.tensor([160.0, 150.0, 140.0])
    _, _, want_tail = reference(logits, 3)
    ids, logprobs, tail = topk_logprobs(logits, 3)
    assert torch.isfinite(tail).all()
    assert_close_f32(tail, want_tail, atol=1e-4, rtol=1e-6)
    assert tail[0].item() == pytest.approx(math.log(997) - 160.0, abs=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_rows_give_nan(impl, dtype):
    logits = torch.zeros(4, 50, dtype=dtype)
    logits[0] = NEG_INF  # no distribution at all (torch.log_softmax: NaN too)
    logits[1, 2] = float("nan")  # NaN inside the first k
    logits[2, 40] = float("nan")  # NaN later in the row
    logits[3, 17] = float("inf")
    ids, logprobs, tail = topk_logprobs(logits, 3)
    assert torch.isnan(logprobs).all() and torch.isnan(tail).all()
    assert ((ids >= 0) & (ids < 50)).all()
    assert ids[0].tolist() == [0, 1, 2]
    assert ids[3, 0].item() == 17
    # A healthy row next to them is unaffected.
    mixed = torch.cat([logits[:1], random_logits(1, 50, dtype)])
    ids, logprobs, tail = topk_logprobs(mixed, 3)
    check_against_reference(mixed[1:], 3, ids[1:], logprobs[1:], tail[1:])


# ---------------------------------------------------------------------------------------------------
# The two implementations agree; the extension's own properties


@pytest.mark.skipif(not extension_available(), reason="compiled extension not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_extension_and_fallback_agree(monkeypatch, dtype):
    logits = torch.cat([random_logits(9, 777, dtype, seed=5), torch.randint(-2, 3, (4, 777)).to(dtype)])
    for k in (1, 13, 777):
        ext = topk_logprobs(logits, k)
        with monkeypatch.context() as m:
            m.setattr(topk_module, "_EXTENSION", None)
            m.setattr(topk_module, "_fallback_warned", True)
            fallback = topk_logprobs(logits, k)
        assert torch.equal(ext[0], fallback[0])
        torch.testing.assert_close(ext[1], fallback[1], atol=2e-5, rtol=2e-6)
        torch.testing.assert_close(ext[2], fallback[2], atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not extension_available(), reason="compiled extension not built")
def test_extension_is_deterministic_across_thread_counts():
    logits = random_logits(37, 3001, torch.float32, seed=8)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = topk_logprobs(logits, 16)
        torch.set_num_threads(max(2, previous))
        many = topk_logprobs(logits, 16)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.skipif(not extension_available(), reason="compiled extension not built")
def test_op_shapes_on_meta_tensors():
    ids, logprobs, tail = torch.ops.selfreplay_fast.topk_logprobs(torch.empty(5, 100, device="meta"), 3)
    assert ids.shape == (5, 3) and ids.dtype == torch.int32 and ids.device.type == "meta"
    assert logprobs.shape == (5, 3) and tail.shape == (5,)


def test_fallback_warns_once_per_process(monkeypatch):
    monkeypatch.setattr(topk_module, "_EXTENSION", None)
    monkeypatch.setattr(topk_module, "_fallback_warned", False)
    logits = random_logits(2, 30, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        topk_logprobs(logits, 3)
        topk_logprobs(logits, 4)
        linear_topk_logprobs(torch.randn(3, 4), torch.randn(30, 4), 2)
    messages = [w for w in caught if issubclass(w.category, RuntimeWarning) and "topk_logprobs" in str(w.message)]
    assert len(messages) == 1
    assert "not available" in str(messages[0].message)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype):
    logits = torch.cat([random_logits(17, 50_257, dtype, seed=1), torch.randint(-3, 4, (3, 50_257)).to(dtype)])
    rows = extreme_rows(vocab=50_257)
    logits = torch.cat([logits, (rows if dtype == torch.float32 else rows[[0, 1, 3, 4, 5]]).to(dtype)])
    for k in (1, 64, 1000, 2048, 3000):  # 3000 > the kernel's limit: the torch path on the GPU
        cpu = topk_logprobs(logits, k)
        gpu = topk_logprobs(logits.cuda(), k)
        assert torch.equal(cpu[0], gpu[0].cpu())
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], atol=5e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(gpu[2].cpu(), cpu[2], atol=5e-5, rtol=1e-5, equal_nan=True)


def _selection_stress_logits(vocab):
    """Rows that stress the CUDA kernel's candidate selection, as float32 [6, vocab]."""
    g = torch.Generator().manual_seed(vocab)
    signed_zeros = torch.zeros(vocab)
    signed_zeros[torch.rand(vocab, generator=g) < 0.5] = -0.0  # -0 and +0 tie: the lower id first
    with_pos_inf = torch.randn(vocab, generator=g)
    with_pos_inf[-1] = float("inf")  # NaN log-probs and tail, for every k (k == V included)
    return torch.stack(
        [
            torch.randint(-2, 3, (vocab,), generator=g).float(),  # heavy ties at the k-th value
            signed_zeros,
            torch.arange(vocab, dtype=torch.float32) * 1e-3,  # ascending: every logit beats the threshold
            -torch.arange(vocab, dtype=torch.float32) * 1e-3,  # descending: none after the first selection
            torch.full((vocab,), NEG_INF),  # no distribution: NaN
            with_pos_inf,
        ]
    )


def _check_selection_stress(device):
    # V around multiples of the kernel's 2048-logit tile; k up to its 2048 limit and k == V.
    for vocab in (1, 7, 2047, 2048, 2049, 4095, 4097, 6145, 50_257):
        logits = _selection_stress_logits(vocab)
        for k in sorted({min(c, vocab) for c in (1, 2, 63, 2048, vocab)}):
            expected = topk_logprobs(logits, k)
            got = topk_logprobs(logits.to(device), k)
            label = f"V={vocab} k={k}"
            assert torch.equal(got[0].cpu(), expected[0]), label
            torch.testing.assert_close(got[1].cpu(), expected[1], atol=5e-5, rtol=1e-5, equal_nan=True, msg=label)
            torch.testing.assert_close(got[2].cpu(), expected[2], atol=5e-5, rtol=1e-5, equal_nan=True, msg=label)


def test_selection_stress_rows_fallback_matches_extension():
    """The torch path (what CUDA uses for k > 2048) and the CPU kernel agree on the same rows."""
    if not extension_available():
        pytest.skip("compiled extension not built")
    def fallback(logits, k):
        return topk_module._topk_logprobs_torch(logits, k)

    for vocab in (1, 7, 2049, 4097):
        logits = _selection_stress_logits(vocab)
        for k in sorted({min(c, vocab) for c in (1, 2, 63, vocab)}):
            expected = topk_logprobs(logits, k)
            got = fallback(logits, k)
            assert torch.equal(got[0], expected[0]), (vocab, k)
            torch.testing.assert_close(got[1], expected[1], atol=5e-5, rtol=1e-5, equal_nan=True)
            torch.testing.assert_close(got[2], expected[2], atol=5e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_selection_stress_rows_match_cpu():
    _check_selection_stress("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_runs_on_the_current_stream():
    """The op must launch on torch's current stream: on another one it would read `x` before the copy
    queued behind a sleep on the current stream has written it."""
    logits = random_logits(256, 50_257, torch.float32, seed=3)
    expected = topk_logprobs(logits, 64)
    source = logits.cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.full_like(source, float("nan"))
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles ahead of the copy
        x.copy_(source)
        got = topk_logprobs(x, 64)
    stream.synchronize()
    assert torch.equal(got[0].cpu(), expected[0])
    torch.testing.assert_close(got[1].cpu(), expected[1], atol=5e-5, rtol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 16 * 2**30,
    reason="needs a CUDA GPU with 16 GiB",
)
def test_cuda_rows_past_2_31_elements():
    """Row offsets past 2^31 elements (64-bit indexing) and a grid of ~43k blocks."""
    vocab = 50_257
    n = 2**31 // vocab + 4
    logits = torch.empty(n, vocab, dtype=torch.bfloat16, device="cuda")
    tail_rows = random_logits(8, vocab, torch.bfloat16, seed=5)
    logits[:-8] = 0.0
    logits[-8:] = tail_rows.cuda()
    ids, logprobs, tail = topk_logprobs(logits, 64)
    expected = topk_logprobs(tail_rows, 64)
    assert torch.equal(ids[-8:].cpu(), expected[0])
    torch.testing.assert_close(logprobs[-8:].cpu(), expected[1], atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(tail[-8:].cpu(), expected[2], atol=5e-5, rtol=1e-5)
    # An all-zero row: ties everywhere, so ids 0..k-1 and log-probs -log(V).
    assert torch.equal(ids[0].cpu(), torch.arange(64, dtype=torch.int32))
    torch.testing.assert_close(logprobs[0].cpu(), torch.full((64,), -math.log(vocab)), atol=1e-5, rtol=1e-6)
    del logits


# ---------------------------------------------------------------------------------------------------
# Bad input


BAD_CALLS = [
    ("not a tensor", lambda: topk_logprobs([[1.0, 2.0]], 1), TypeError, "logits must be a torch.Tensor"),
    ("integer logits", lambda: topk_logprobs(torch.ones(2, 5, dtype=torch.int64), 1), TypeError, "logits"),
    ("bool logits", lambda: topk_logprobs(torch.ones(2, 5, dtype=torch.bool), 1), TypeError, "logits"),
    ("float64 logits", lambda: topk_logprobs(torch.ones(2, 5, dtype=torch.float64), 1), TypeError, "logits"),
    ("rank 1", lambda: topk_logprobs(torch.zeros(5), 1), ValueError, "2-D"),
    ("rank 3", lambda: topk_logprobs(torch.zeros(2, 3, 5), 1), ValueError, "2-D"),
    ("empty vocabulary", lambda: topk_logprobs(torch.zeros(2, 0), 1), ValueError, "vocabulary"),
    ("non-contiguous", lambda: topk_logprobs(torch.zeros(5, 4).t(), 1), ValueError, "contiguous"),
    ("k = 0", lambda: topk_logprobs(torch.zeros(2, 5), 0), ValueError, "k must be >= 1"),
    ("k < 0", lambda: topk_logprobs(torch.zeros(2, 5), -2), ValueError, "k must be >= 1"),
    ("k > V", lambda: topk_logprobs(torch.zeros(2, 5), 6), ValueError, r"k \(6\) must be <= the vocabulary size V"),
    ("float k", lambda: topk_logprobs(torch.zeros(2, 5), 2.0), TypeError, "k must be an int"),
    ("bool k", lambda: topk_logprobs(torch.zeros(2, 5), True), TypeError, "k must be an int"),
]


@pytest.mark.parametrize("name,call,error,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected(impl, name, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.skipif(not extension_available(), reason="compiled extension not built")
@pytest.mark.parametrize(
    "logits,k,error,match",
    [
        (torch.zeros(2, 5, dtype=torch.int32), 1, TypeError, "float32, bfloat16 or float16"),
        (torch.zeros(5), 1, ValueError, "2-D"),
        (torch.zeros(5, 4).t(), 1, ValueError, "contiguous"),
        (torch.zeros(2, 5), 0, ValueError, "k must be >= 1"),
        (torch.zeros(2, 5), 6, ValueError, "must be <= the vocabulary size"),
    ],
    ids=["integer", "rank", "non-contiguous", "k<1", "k>V"],
)
def test_raw_op_rejects_bad_input(logits, k, error, match):
    """The op checks its input too, for callers that bypass the Python wrapper."""
    with pytest.raises(error, match=match):
        torch.ops.selfreplay_fast.topk_logprobs(logits, k)


# ---------------------------------------------------------------------------------------------------
# linear_topk_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_full_logits(impl, dtype, chunk_size, with_bias):
    g = torch.Generator().manual_seed(21)
    n, dim, vocab, k = 11, 16, 301, 8
    hidden = torch.randn(n, dim, generator=g).to(dtype)
    weight = torch.randn(vocab, dim, generator=g).to(dtype)
    bias = torch.randn(vocab, generator=g).to(dtype) if with_bias else None
    ids, logprobs, tail = linear_topk_logprobs(hidden, weight, k, bias=bias, chunk_size=chunk_size)
    logits = hidden.float() @ weight.float().t()  # fp32 logits from the upcast inputs
    if bias is not None:
        logits = logits + bias.float()
    want = topk_logprobs(logits, k)
    assert torch.equal(ids, want[0])
    torch.testing.assert_close(logprobs, want[1], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(tail, want[2], atol=1e-5, rtol=1e-5)
    check_against_reference(logits, k, ids, logprobs, tail)


def test_linear_never_materializes_more_than_a_chunk(impl, monkeypatch):
    """Every topk_logprobs call inside sees at most chunk_size rows."""
    seen = []
    inner = topk_module.topk_logprobs

    def spy(logits, k):
        seen.append(tuple(logits.shape))
        return inner(logits, k)

    monkeypatch.setattr(topk_module, "topk_logprobs", spy)
    linear_topk_logprobs(torch.randn(10, 4), torch.randn(50, 4), 3, chunk_size=4)
    assert seen == [(4, 50), (4, 50), (2, 50)]


def test_linear_detaches_and_handles_empty_input(impl):
    hidden = torch.randn(3, 4, requires_grad=True)
    weight = torch.randn(20, 4, requires_grad=True)
    ids, logprobs, tail = linear_topk_logprobs(hidden, weight, 5)
    assert not logprobs.requires_grad and not tail.requires_grad
    ids, logprobs, tail = linear_topk_logprobs(torch.empty(0, 4), torch.randn(20, 4), 5)
    assert ids.shape == (0, 5) and tail.shape == (0,)


LINEAR_BAD_CALLS = [
    ("hidden not a tensor", dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
    ("integer weight", dict(weight=torch.ones(20, 4, dtype=torch.int64)), TypeError, "weight"),
    ("hidden rank", dict(hidden=torch.randn(2, 3, 4)), ValueError, "hidden must be 2-D"),
    ("weight rank", dict(weight=torch.randn(20)), ValueError, "weight must be 2-D"),
    ("D mismatch", dict(weight=torch.randn(20, 5)), ValueError, "must share D"),
    ("bias shape", dict(bias=torch.randn(19)), ValueError, r"bias must have shape \[V\]"),
    ("bias dtype", dict(bias=torch.ones(20, dtype=torch.int32)), TypeError, "bias"),
    ("k > V", dict(k=21), ValueError, "must be <= the vocabulary size"),
    ("k = 0", dict(k=0), ValueError, "k must be >= 1"),
    ("chunk_size = 0", dict(chunk_size=0), ValueError, "chunk_size"),
    ("chunk_size float", dict(chunk_size=2.5), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("name,override,error,match", LINEAR_BAD_CALLS, ids=[c[0] for c in LINEAR_BAD_CALLS])
def test_linear_bad_input_is_rejected(name, override, error, match):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(20, 4), k=3, bias=None, chunk_size=None)
    args.update(override)
    with pytest.raises(error, match=match):
        linear_topk_logprobs(**args)


def test_environment_switch_disables_the_extension():
    """SELFREPLAY_FAST_DISABLE_EXTENSION=1 at import: the torch path, one warning that says why."""
    code = (
        "import warnings, torch\n"
        "from selfreplay_fast import topk\n"
        "assert not topk.extension_available()\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    ids, _, _ = topk.topk_logprobs(torch.tensor([[0.0, 2.0, 1.0]]), 2)\n"
        "    topk.topk_logprobs(torch.zeros(1, 3), 1)\n"
        "assert ids.tolist() == [[1, 2]], ids\n"
        "assert len(caught) == 1 and 'SELFREPLAY_FAST_DISABLE_EXTENSION' in str(caught[0].message)\n"
    )
    env = dict(os.environ, SELFREPLAY_FAST_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_linear_topk_logprobs_keeps_16bit_gpu_operands_and_warns_on_mixed():
    """On a GPU a 16-bit head is multiplied as it is, with fp32 output (no fp32 copy of the weight, no
    fp32 matmul); mixed 16-bit / fp32 operands warn of the fp32 matmuls. The CPU upcasts (no
    16-bit x 16-bit -> fp32 matmul there). meta tensors stand for CUDA's choice; a stand-in for the
    CUDA warning (only device and dtype are read)."""
    import warnings

    from selfreplay_fast.topk import _matmul_operand_dtype

    class _Cuda:
        def __init__(self, dtype):
            self.device, self.dtype = torch.device("cuda"), dtype

    bf16_meta = torch.empty(4, 4, dtype=torch.bfloat16, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _matmul_operand_dtype(bf16_meta, bf16_meta, torch.float32) == torch.bfloat16
        assert _matmul_operand_dtype(_Cuda(torch.float16), _Cuda(torch.float16), torch.float32) == torch.float16
        cpu = torch.empty(4, 4, dtype=torch.bfloat16)
        assert _matmul_operand_dtype(cpu, cpu, torch.float32) == torch.float32
    with pytest.warns(UserWarning, match="fp32 matmuls"):
        assert _matmul_operand_dtype(_Cuda(torch.bfloat16), _Cuda(torch.float32), torch.float32) == torch.float32
