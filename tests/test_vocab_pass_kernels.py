"""The Triton vocabulary passes (kernels/vocab_pass.py) against plain float64 PyTorch.

Without a GPU the kernels run under the Triton interpreter, so shapes are small and odd: vocabularies
smaller than, equal to and larger than the tile width, rows without used slots, rows where every token
is a teacher slot, peaked logits, and padded row strides.
"""

import itertools
import math

import pytest
import torch
import triton  # noqa: F401  (a hard test dependency: imported here so that a missing triton fails loudly)

from selfreplay_fast.kernels import vocab_pass
from selfreplay_fast.kernels.vocab_pass import masked_lse, scale_, softmax_grad

# tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU; with one, the kernels run on it.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")
TILE = 32  # the block_v override: V = 1, 5 are below it, V = 32 equals it, V = 37, 300 exceed it
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-7),
}


# --------------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# --------------------------------------------------------------------------------------------------


def make_inputs(c, V, k, dtype=torch.float32, seed=0, peaked=False, padded=False, id_dtype=torch.int64):
    """Logits [c, V] and ids [c, k]. Row 0 has no used slot (when c > 1); other rows use min(k, V)
    distinct ids, with a few slots dropped to -1 at random positions (row 2 keeps only k - 1 when
    k = V, so it has a one-token complement). ``peaked`` lifts one logit per row 60 above the rest,
    on a teacher id in even rows and off the ids in odd ones. ``padded`` gives a row stride > V."""
    gen = torch.Generator().manual_seed(seed)
    stride = V + 3 if padded else V
    storage = torch.randn(c, stride, generator=gen, dtype=torch.float64) * 3
    logits = storage.to(dtype)[:, :V]
    ids = torch.full((c, k), -1, dtype=torch.int64)
    for n in range(c):
        if n == 0 and c > 1:
            continue
        perm = torch.randperm(V, generator=gen)
        used = min(k, V)
        ids[n, :used] = perm[:used]
        if k < V and k > 1 and n % 2 == 1:
            ids[n, torch.randint(k, (1,), generator=gen)] = -1
        if k == V and n == 2:
            ids[n, -1] = -1
        ids[n] = ids[n, torch.randperm(k, generator=gen)]  # unused slots anywhere, not only at the end
        if peaked:
            teacher = [int(i) for i in ids[n] if i >= 0]
            others = [v for v in range(V) if v not in teacher]
            pool = teacher if (n % 2 == 0 and teacher) or not others else others
            peak = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            logits[n, peak] = logits[n].max() + 60
    return logits.to(DEVICE), ids.to(device=DEVICE, dtype=id_dtype)


def slot_mask(ids, V):
    """[c, V] bool: True at the row's used ids."""
    mask = torch.zeros(ids.shape[0], V, dtype=torch.bool, device=ids.device)
    for n, i in zip(*torch.nonzero(ids >= 0, as_tuple=True)):
        mask[n, ids[n, i]] = True
    return mask


def reference_masked_lse(logits, ids, inv_temp):
    z = logits.double() * inv_temp
    used = ids >= 0
    z_teacher = torch.full(ids.shape, NEG_INF, dtype=torch.float64, device=logits.device)
    z_teacher[used] = z.gather(1, ids.long().clamp_min(0))[used]
    mask = slot_mask(ids, logits.shape[1])
    complement = z.masked_fill(mask, NEG_INF)
    # Plain log(sum(exp)) with the max pulled out; an all -inf row gives -inf.
    row_max = complement.max(dim=1).values
    shift = torch.where(row_max == NEG_INF, 0.0, row_max)
    lse = torch.log(torch.exp(complement - shift[:, None]).sum(dim=1)) + shift
    return z_teacher, lse


def reference_softmax_grad(logits, ids, grad_teacher, sign, origin, log_coef, inv_temp):
    z = logits.double() * inv_temp
    z = z.masked_fill(slot_mask(ids, logits.shape[1]), NEG_INF)
    shift = torch.where(origin == NEG_INF, 0.0, origin.double()) - log_coef.double()
    out = sign.double()[:, None] * torch.exp(z - shift[:, None])
    for n, i in zip(*torch.nonzero(ids >= 0, as_tuple=True)):
        out[n, ids[n, i]] = grad_teacher[n, i].double()
    return out


def run_masked_lse(logits, ids, inv_temp, **kw):
    """masked_lse, with the complement's log-sum-exp reassembled in float64 from the (max, log-sum)
    pair it returns; checks that pair's contract on the way (max in the logits' dtype, log-sum in
    [0, log V] for a non-empty finite complement, both -inf for an empty one)."""
    z_teacher, max_c, logsum_c = masked_lse(logits, ids, inv_temp, **kw)
    assert max_c.dtype == logsum_c.dtype == z_teacher.dtype == logits.dtype
    finite = torch.isfinite(max_c)
    assert (logsum_c[finite] >= 0).all() and (logsum_c[finite] <= math.log(logits.shape[1]) + 1e-5).all()
    assert torch.equal(max_c == NEG_INF, logsum_c == NEG_INF)
    return z_teacher, max_c.double() + logsum_c.double()


def row_scalars(z_teacher, max_complement, logsum_complement, seed=0):
    """Realistic per-row scalars: origin = the complement's max, log_coef = the log of a coefficient
    in [0.05, 2] relative to exp(z - origin) (the dense gradient coef * q_v), signs of both kinds
    (sign = 0 in the last row), grad_teacher 0 on unused slots."""
    gen = torch.Generator().manual_seed(seed + 1)
    c, k = z_teacher.shape
    dtype = z_teacher.dtype
    lse_complement = max_complement.double() + logsum_complement.double()
    lse = torch.logaddexp(lse_complement, z_teacher.double().logsumexp(dim=1))
    coef = 0.05 + 1.95 * torch.rand(c, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(c, generator=gen) < 0.5, 1.0, -1.0).double()
    sign[-1] = 0.0
    noise = torch.randn(c, k, generator=gen, dtype=torch.float64)
    grad_teacher = torch.where(z_teacher.cpu() > NEG_INF, noise, 0.0)
    dev = z_teacher.device
    log_coef = coef.log().to(dev) + max_complement.double() - lse
    return tuple(t.to(device=dev, dtype=dtype) for t in (grad_teacher.to(dev), sign.to(dev), max_complement, log_coef))


def assert_close(actual, expected, dtype, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN in the kernel's result"
    torch.testing.assert_close(
        actual.double(), expected.double(), **TOL[dtype], equal_nan=False, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------------
# masked_lse
# --------------------------------------------------------------------------------------------------

SHAPES = [
    (c, V, k)
    for c, V, k in itertools.product([1, 3, 7], [1, 5, 32, 37, 300], ["1", "3", "V"])
    if not (k == "3" and V < 3)
]


def _k(k, V):
    return V if k == "V" else int(k)


@pytest.mark.parametrize("c,V,k", SHAPES, ids=[f"c{c}-V{V}-k{k}" for c, V, k in SHAPES])
def test_masked_lse_matches_reference(c, V, k):
    k = _k(k, V)
    for case, (inv_temp, block_v) in enumerate(itertools.product([1.0, 0.37], [None, TILE])):
        logits, ids = make_inputs(c, V, k, seed=case, peaked=case == 3, padded=c == 3)
        original = logits.clone()
        z_ref, lse_ref = reference_masked_lse(original, ids, inv_temp)

        z_teacher, lse = run_masked_lse(logits, ids, inv_temp, block_v=block_v)

        what = f"inv_temp={inv_temp} block_v={block_v}"
        assert z_teacher.shape == (c, k) and lse.shape == (c,)
        assert z_teacher.dtype == torch.float32
        assert_close(z_teacher, z_ref, torch.float32, f"z_teacher, {what}")
        assert_close(lse, lse_ref, torch.float32, f"lse_complement, {what}")
        # Side effect: -inf exactly at the used ids, every other entry untouched.
        mask = slot_mask(ids, V)
        assert torch.equal(logits, original.masked_fill(mask, NEG_INF)), what
        # Rows where every token is a used id have an empty complement.
        assert torch.equal(lse == NEG_INF, mask.all(dim=1)), what


def test_masked_lse_empty_complement_and_empty_rows():
    V = 37
    logits = torch.randn(3, V, device=DEVICE)
    ids = torch.stack([torch.randperm(V), torch.full((V,), -1), torch.randperm(V)]).to(DEVICE)
    ids[2, 5] = -1
    z_teacher, lse = run_masked_lse(logits, ids, 0.37, block_v=TILE)
    assert lse[0].item() == NEG_INF
    assert torch.isinf(logits[0]).all() and (logits[0] < 0).all()
    assert torch.isfinite(lse[1:]).all()
    assert (z_teacher[1] == NEG_INF).all()
    assert not torch.isnan(z_teacher).any() and not torch.isnan(lse).any()


def test_masked_lse_int32_ids_and_float64():
    logits, ids = make_inputs(3, 300, 7, dtype=torch.float64, seed=4, peaked=True, id_dtype=torch.int32)
    z_ref, lse_ref = reference_masked_lse(logits, ids, 0.37)
    z_teacher, lse = run_masked_lse(logits, ids, 0.37, block_v=TILE)
    assert z_teacher.dtype == torch.float64
    assert_close(z_teacher, z_ref, torch.float64, "z_teacher fp64")
    assert_close(lse, lse_ref, torch.float64, "lse_complement fp64")


def test_masked_lse_propagates_nan_and_inf_like_torch_logsumexp():
    """NaN anywhere in the complement gives NaN, else +inf gives +inf (as torch.logsumexp), whatever
    tile holds it; -inf is an ordinary token of weight 0; a non-finite slot logit leaves the
    complement alone and is gathered as it is."""
    V = 37
    logits, ids = make_inputs(6, V, 3, seed=9)
    off = [next(v for v in range(V) if not (ids[n] == v).any()) for n in range(6)]
    specials = [float("nan"), float("inf"), float("-inf"), float("nan"), float("inf")]
    for n, value in enumerate(specials):
        logits[n, off[n] if n < 3 else V - 1 - n] = value
    logits[3, 0] = float("inf")  # NaN and +inf in one row: NaN
    on = int(ids[5][ids[5] >= 0][0])
    logits[5, on] = float("nan")
    original = logits.clone()
    z_teacher, max_c, logsum_c = masked_lse(logits, ids, 0.37, block_v=TILE)
    lse = max_c.double() + logsum_c.double()
    expected = (original.double() * 0.37).masked_fill(slot_mask(ids, V), NEG_INF).logsumexp(dim=1)
    torch.testing.assert_close(lse, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(max_c[[0, 3]]).all() and (max_c[[1, 4]] == float("inf")).all()
    assert torch.isnan(lse[[0, 3]]).all() and torch.isnan(z_teacher[5][ids[5] == on]).all()


def test_softmax_grad_zero_sign_is_exact_zero_on_nonfinite_logits():
    """A row that does not count (sign 0) gets exact zeros even where its logits are NaN or inf; a
    counted row's NaN logit stays NaN."""
    V = 37
    logits = torch.randn(3, V, device=DEVICE)
    logits[0, 4], logits[0, 5], logits[1, 6] = float("nan"), float("inf"), float("nan")
    ids = torch.full((3, 2), -1, device=DEVICE)
    zeros = torch.zeros(3, device=DEVICE)
    sign = torch.tensor([0.0, 1.0, 1.0], device=DEVICE)
    out = softmax_grad(logits, ids, torch.zeros(3, 2, device=DEVICE), sign, zeros, zeros, 1.0,
                       torch.empty(3, V, device=DEVICE), block_v=TILE)
    assert torch.equal(out[0], torch.zeros(V, device=DEVICE))
    assert torch.isnan(out[1, 6]) and torch.isfinite(out[2]).all()


# --------------------------------------------------------------------------------------------------
# softmax_grad
# --------------------------------------------------------------------------------------------------

# "bf16-in-logits": the 16-bit gradient written into the fp32 logits' own storage (narrow_grad_view:
# two programs per row where the row has two tiles or more), as the dispatcher does for 16-bit heads.
OUT_KINDS = ["fp32-inplace", "fp32", "bf16", "fp16", "fp64-inplace", "fp64-to-bf16", "bf16-in-logits"]
GRAD_SHAPES = [(3, 5, "3"), (7, 37, "3"), (3, 300, "V"), (1, 300, "1"), (7, 32, "V"), (3, 1, "1")]


def _run_softmax_grad(c, V, k, out_kind, inv_temp, block_v, seed, peaked):
    logits_dtype = torch.float64 if out_kind.startswith("fp64") else torch.float32
    out_dtype = {
        "fp32-inplace": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
        "fp16": torch.float16, "fp64-inplace": torch.float64, "fp64-to-bf16": torch.bfloat16,
        "bf16-in-logits": torch.bfloat16,
    }[out_kind]
    logits, ids = make_inputs(c, V, k, dtype=logits_dtype, seed=seed, peaked=peaked, padded=seed % 2 == 1)
    original = logits.clone()
    scalars = row_scalars(*masked_lse(logits, ids, inv_temp, block_v=block_v), seed)
    expected = reference_softmax_grad(original, ids, *scalars, inv_temp)

    if out_kind.endswith("inplace"):
        out = logits
    elif out_kind.endswith("in-logits"):
        out = vocab_pass.narrow_grad_view(logits, out_dtype, block_v=block_v)
    else:
        out = torch.full((c, V + 2), float("nan"), dtype=out_dtype, device=DEVICE)[:, :V]  # padded row stride
    result = softmax_grad(logits, ids, *scalars, inv_temp, out, block_v=block_v)
    assert result is out and result.dtype == out_dtype
    return result, expected, out_dtype


@pytest.mark.parametrize("out_kind", OUT_KINDS)
@pytest.mark.parametrize("c,V,k", GRAD_SHAPES, ids=[f"c{c}-V{V}-k{k}" for c, V, k in GRAD_SHAPES])
def test_softmax_grad_matches_reference(c, V, k, out_kind):
    k = _k(k, V)
    for case, (inv_temp, block_v) in enumerate(itertools.product([1.0, 0.37], [None, TILE])):
        result, expected, out_dtype = _run_softmax_grad(
            c, V, k, out_kind, inv_temp, block_v, seed=case, peaked=case % 2 == 0
        )
        assert_close(result, expected, out_dtype, f"{out_kind} inv_temp={inv_temp} block_v={block_v}")


INPLACE_SHAPES = [(c, V, k) for c in (1, 3, 7) for V, k in ((1, "1"), (5, "V"), (37, "1"), (300, "3"))]


@pytest.mark.parametrize("c,V,k", INPLACE_SHAPES, ids=[f"c{c}-V{V}-k{k}" for c, V, k in INPLACE_SHAPES])
def test_softmax_grad_inplace_shapes(c, V, k):
    """The in-place fp32 path over the remaining (c, V) combinations."""
    k = _k(k, V)
    result, expected, _ = _run_softmax_grad(c, V, k, "fp32-inplace", 0.37, TILE, c + V, peaked=c == 7)
    assert_close(result, expected, torch.float32, "fp32-inplace")


def test_softmax_grad_is_nan_free_on_degenerate_rows():
    """Every token a used id (z = -inf everywhere, even with origin = -inf), and a zero sign next to
    logits whose exponentials overflow fp32."""
    V = 37
    logits = torch.randn(3, V, device=DEVICE)
    logits[2] += 200.0  # exp(z - 0) = inf in fp32
    ids = torch.stack([torch.randperm(V), torch.randperm(V), torch.full((V,), -1)]).to(DEVICE)
    masked_lse(logits, ids, 1.0, block_v=TILE)
    grad_teacher = torch.where(ids >= 0, torch.randn(3, V, device=DEVICE), 0.0)
    sign = torch.tensor([1.0, -1.0, 0.0], device=DEVICE)
    origin = torch.tensor([NEG_INF, 5.0, 0.0], device=DEVICE)
    log_coef = torch.zeros(3, device=DEVICE)
    out = torch.empty(3, V, device=DEVICE)
    softmax_grad(logits, ids, grad_teacher, sign, origin, log_coef, 1.0, out, block_v=TILE)
    assert not torch.isnan(out).any()
    expected = torch.zeros(3, V, device=DEVICE)
    expected.scatter_(1, ids[:2], grad_teacher[:2])
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------


def test_wrappers_reject_bad_arguments():
    logits, ids = make_inputs(3, 37, 3)
    scalars = [torch.zeros(3, device=DEVICE) for _ in range(3)]
    grad_teacher = torch.zeros(3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        masked_lse(logits.half(), ids, 1.0)
    with pytest.raises(ValueError, match="logits"):
        masked_lse(logits.t(), ids, 1.0)
    with pytest.raises(ValueError, match="ids"):
        masked_lse(logits, ids[:2], 1.0)
    with pytest.raises(ValueError, match="ids"):
        masked_lse(logits, ids.float(), 1.0)
    with pytest.raises(ValueError, match="inv_temp"):
        masked_lse(logits, ids, torch.tensor(1.0))
    with pytest.raises(ValueError, match="grad_teacher"):
        softmax_grad(logits, ids, grad_teacher.double(), *scalars, 1.0, logits)
    with pytest.raises(ValueError, match="origin"):
        softmax_grad(logits, ids, grad_teacher, scalars[0], torch.zeros(4, device=DEVICE), scalars[2], 1.0, logits)
    with pytest.raises(ValueError, match="log_coef"):
        softmax_grad(logits, ids, grad_teacher, *scalars[:2], torch.zeros(3, device=DEVICE).double(), 1.0, logits)
    with pytest.raises(ValueError, match="out"):
        softmax_grad(logits, ids, grad_teacher, *scalars, 1.0, torch.empty(3, 37, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        storage = torch.empty(3, 40, device=DEVICE)
        softmax_grad(storage[:, :37], ids, grad_teacher, *scalars, 1.0, storage[:, 1:38])
    with pytest.raises(ValueError, match="out"):  # a narrower out in the logits' storage, not at each row's start
        softmax_grad(logits, ids, grad_teacher, *scalars, 1.0, logits.view(torch.bfloat16)[:, 1:38])


@pytest.mark.parametrize("c,V,k", [(3, 37, "V"), (7, 300, "3"), (3, 300, "V")])
def test_slot_tiles_smaller_than_k(c, V, k):
    """More teacher slots than one register tile holds (k up to V): both kernels loop over slot tiles."""
    k = _k(k, V)
    for block_k in (1, 2, 16):
        logits, ids = make_inputs(c, V, k, seed=block_k, peaked=True)
        original = logits.clone()
        z_ref, lse_ref = reference_masked_lse(original, ids, 0.37)
        z_teacher, max_c, logsum_c = masked_lse(logits, ids, 0.37, block_v=TILE, block_k=block_k)
        lse = max_c.double() + logsum_c.double()
        assert_close(z_teacher, z_ref, torch.float32, f"z_teacher block_k={block_k}")
        assert_close(lse, lse_ref, torch.float32, f"lse_complement block_k={block_k}")
        assert torch.equal(logits, original.masked_fill(slot_mask(ids, V), NEG_INF))
        scalars = row_scalars(z_teacher, max_c, logsum_c, seed=block_k)
        expected = reference_softmax_grad(original, ids, *scalars, 0.37)
        out = softmax_grad(logits, ids, *scalars, 0.37, logits, block_v=TILE, block_k=block_k)
        assert_close(out, expected, torch.float32, f"softmax_grad block_k={block_k}")


def test_block_k_must_be_a_power_of_two():
    logits, ids = make_inputs(3, 37, 3)
    with pytest.raises(ValueError, match="block_k"):
        masked_lse(logits, ids, 1.0, block_k=3)


# --------------------------------------------------------------------------------------------------
# scale_
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_forms_the_product_in_fp32(dtype, monkeypatch):
    """values * scale rounded once from fp32 (torch's mul_ would round the scale 1/3 to 16 bits first),
    over several programs with a partial last one."""
    monkeypatch.setattr(vocab_pass, "SCALE_BLOCK_INTERPRETER", 64)
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(1000, generator=g) * 4).to(dtype).to(DEVICE)
    scale = torch.tensor(1 / 3, dtype=torch.float32, device=DEVICE)
    expected = (values.float() * scale).to(dtype)
    rounded_scale = (values.float() * scale.to(dtype).float()).to(dtype)  # as CUDA's values.mul_(scale) does
    assert not torch.equal(expected, rounded_scale)  # the test can fail
    assert scale_(values, scale) is values
    assert torch.equal(values, expected)


def test_scale_rejects_bad_arguments():
    values = torch.zeros(8, dtype=torch.bfloat16, device=DEVICE)
    one = torch.ones((), device=DEVICE)
    with pytest.raises(ValueError, match="values"):
        scale_(values.float(), one)
    with pytest.raises(ValueError, match="contiguous"):
        scale_(torch.zeros(4, 4, dtype=torch.bfloat16, device=DEVICE).t(), one)
    with pytest.raises(ValueError, match="scale"):
        scale_(values, one.double())
    with pytest.raises(ValueError, match="scale"):
        scale_(values, torch.ones(2, device=DEVICE))


# --------------------------------------------------------------------------------------------------
# lse_and_row_terms: the split partials and the fused per-row scalars
# --------------------------------------------------------------------------------------------------


def make_teacher(ids, seed, tail_mass):
    """Teacher log-probabilities on the used slots (0 elsewhere) summing to 1 - tail_mass[n], the exact
    tail log-probability, and row scales of both signs with one 0."""
    gen = torch.Generator().manual_seed(seed + 7)
    c, k = ids.shape
    used = (ids >= 0).cpu()
    raw = torch.randn(c, k, generator=gen, dtype=torch.float64) * 2
    raw[0, 0] += 30  # a peaked teacher row
    lp = torch.where(used, raw, NEG_INF).log_softmax(-1) + torch.log1p(-tail_mass)[:, None]
    lp = torch.where(used, lp, 0.0)
    scale = torch.rand(c, generator=gen, dtype=torch.float64) + 0.1
    scale[-1] = 0.0
    scale[0] = -scale[0]
    return lp.to(DEVICE), tail_mass.log().to(DEVICE), scale.to(DEVICE)


ROW_TERM_SHAPES = [(3, 37, 3), (7, 300, 7), (4, 40, 40), (5, 1001, 16)]


@pytest.mark.parametrize("c,V,k", ROW_TERM_SHAPES, ids=[f"c{c}-V{V}-k{k}" for c, V, k in ROW_TERM_SHAPES])
@pytest.mark.parametrize("mode,given_tail", [("tail", False), ("tail", True), ("sampled", False)])
def test_lse_and_row_terms_match_compute_row_terms(c, V, k, mode, given_tail):
    """The two launches (vocabulary split partials, then combine + row terms in one program per row)
    against the PyTorch path in float64 (masked_lse + compute_row_terms + RowTerms.scaled), on peaked
    student rows, with several vocabulary splits, slot tiles smaller than k, and fp32 and fp64."""
    from selfreplay_fast import _vocab_pass_torch

    # Row 2 has no tail when it is given exactly (log r = -inf); computed as 1 - sum p, a zero tail is
    # decided by rounding (fp32 against fp64), so there it is small instead.
    tail_mass = torch.tensor([1e-6, 0.3, 0.0 if given_tail else 1e-4, 0.05, 0.5, 0.2, 0.01], dtype=torch.float64)[:c]
    for case, (dtype, split_v, block_k, inv_temp) in enumerate(
        [(torch.float32, None, None, 1.0), (torch.float32, TILE, 2, 0.37), (torch.float64, 2 * TILE, None, 1.7)]
    ):
        logits, ids = make_inputs(c, V, k, dtype=dtype, seed=case, peaked=True)
        lp, log_tail, scale = make_teacher(ids, case, tail_mass)
        tail = log_tail if given_tail else None
        original = logits.clone()
        ref_loss = torch.empty(c, dtype=torch.float64, device=DEVICE)
        ref = _vocab_pass_torch.lse_and_row_terms(original.double().clone(), ids.long(), inv_temp, lp, tail, mode, V,
                                                  scale, ref_loss)
        loss = torch.empty(c, dtype=dtype, device=DEVICE)
        got = vocab_pass.lse_and_row_terms(logits, ids, inv_temp, lp.to(dtype), None if tail is None else tail.to(dtype),
                                           mode, V, scale.to(dtype), loss, block_v=TILE, block_k=block_k, split_v=split_v)
        what = f"{mode} given_tail={given_tail} {dtype} split_v={split_v} block_k={block_k}"
        assert torch.equal(logits, original.masked_fill(slot_mask(ids, V), NEG_INF)), what
        assert_close(loss, ref_loss, dtype, f"loss, {what}")
        sign, origin, log_coef, grad_teacher = got
        assert all(t.dtype == dtype for t in got)
        assert torch.equal(sign.double(), ref[0]), f"sign, {what}"
        assert_close(origin, ref[1], dtype, f"origin, {what}")
        assert torch.equal(log_coef == NEG_INF, ref[2] == NEG_INF), f"log_coef -inf, {what}"
        # The dense gradient at the complement's largest logit, sign exp(log_coef): log_coef itself is
        # the log of a difference that may nearly cancel, ill-conditioned against float64.
        assert_close(sign * log_coef.exp(), ref[0] * ref[2].exp(), dtype, f"dense gradient at the max, {what}")
        assert_close(grad_teacher, ref[3], dtype, f"grad_teacher, {what}")
        assert (sign[-1] == 0).all() and (grad_teacher[-1] == 0).all()  # a zero row scale: exact zeros
        # without a row scale: the same loss, no gradient scalars
        loss_only = torch.empty(c, dtype=dtype, device=DEVICE)
        assert vocab_pass.lse_and_row_terms(original.clone(), ids, inv_temp, lp.to(dtype),
                                            None if tail is None else tail.to(dtype), mode, V, None, loss_only,
                                            block_v=TILE, block_k=block_k, split_v=split_v) is None
        assert torch.equal(loss_only, loss), what


def test_lse_and_row_terms_propagate_nan_and_inf_like_compute_row_terms():
    """A NaN or +inf logit in the complement or on a slot makes the row's loss and dense sign NaN, as
    compute_row_terms does; the other rows are untouched."""
    from selfreplay_fast import _vocab_pass_torch

    c, V, k = 5, 37, 3
    logits, ids = make_inputs(c, V, k, seed=11)
    off = [next(v for v in range(V) if not (ids[n] == v).any()) for n in range(c)]
    logits[1, off[1]] = float("nan")
    logits[2, off[2]] = float("inf")
    logits[3, int(ids[3][ids[3] >= 0][0])] = float("inf")
    lp, _, scale = make_teacher(ids, 3, torch.full((c,), 0.2, dtype=torch.float64))
    scale[-1] = 1.0
    ref_loss = torch.empty(c, dtype=torch.float64, device=DEVICE)
    ref = _vocab_pass_torch.lse_and_row_terms(logits.double().clone(), ids, 1.0, lp, None, "tail", V, scale, ref_loss)
    loss = torch.empty(c, device=DEVICE)
    got = vocab_pass.lse_and_row_terms(logits.clone(), ids, 1.0, lp.float(), None, "tail", V, scale.float(), loss,
                                       block_v=TILE, split_v=TILE)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(loss[1:4]).all() and torch.isfinite(loss[[0, 4]]).all()
    torch.testing.assert_close(got[0].double(), ref[0], equal_nan=True)
    assert torch.isnan(got[0][1:4]).all()


def test_lse_and_row_terms_rejects_bad_arguments():
    logits, ids = make_inputs(3, 37, 3)
    lp = torch.zeros(3, 3, device=DEVICE)
    loss = torch.empty(3, device=DEVICE)
    with pytest.raises(ValueError, match="mode"):
        vocab_pass.lse_and_row_terms(logits, ids, 1.0, lp, None, "topk", 37, None, loss)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        vocab_pass.lse_and_row_terms(logits, ids, 1.0, lp[:, :2], None, "tail", 37, None, loss)
    with pytest.raises(ValueError, match="loss_out"):
        vocab_pass.lse_and_row_terms(logits, ids, 1.0, lp, None, "tail", 37, None, loss[:2])
    with pytest.raises(ValueError, match="split_v"):
        vocab_pass.lse_and_row_terms(logits, ids, 1.0, lp, None, "tail", 37, None, loss, block_v=TILE, split_v=48)


# --------------------------------------------------------------------------------------------------
# topk_row_terms: mode "topk"'s loss and slot gradients from the slots alone
# --------------------------------------------------------------------------------------------------


def slot_logits(logits, ids, inv_temp, dtype):
    """The dispatcher's z_teacher in ``dtype``: the scaled logits on used slots, -inf on unused ones."""
    z = logits.double().gather(1, ids.long().clamp_min(0)) * inv_temp
    return torch.where(ids >= 0, z, NEG_INF).to(dtype)


def reference_topk(logits, ids, lp, inv_temp, scale):
    """(loss [c], row_scale * dL/dz on the slots [c, k]) of reference_replay_kl (float64, autograd), one row
    at a time with the row's logits as the bias of a zero head: dL/dz = T dL/dx."""
    import selfreplay_fast as sf

    losses, grads = [], []
    for n in range(ids.shape[0]):
        x = logits[n].double().cpu().clone().requires_grad_()
        zeros = torch.zeros(1, 1, dtype=torch.float64)
        with sf.skip_value_checks():
            loss = sf.reference_replay_kl(zeros, torch.zeros(x.shape[0], 1, dtype=torch.float64),
                                          ids[n : n + 1].long().cpu(), lp[n : n + 1].double().cpu(), bias=x,
                                          mode="topk", temperature=1 / inv_temp, reduction="sum")
        (grad_x,) = torch.autograd.grad(loss, x, allow_unused=True)
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        used = ids[n].cpu() >= 0
        g = torch.where(used, grad_x.gather(0, ids[n].long().cpu().clamp_min(0)) / inv_temp, 0.0)
        losses.append(loss.detach())
        grads.append(g * scale[n].double().cpu())
    return torch.stack(losses).to(DEVICE), torch.stack(grads).to(DEVICE)


TOPK_SHAPES = ROW_TERM_SHAPES + [(3, 300, 150)]  # k above the kernel's 128-slot tile


@pytest.mark.parametrize("c,V,k", TOPK_SHAPES, ids=[f"c{c}-V{V}-k{k}" for c, V, k in TOPK_SHAPES])
def test_topk_row_terms_match_the_reference(c, V, k):
    """One launch (one program per row) against the float64 reference (reference_replay_kl) and the
    PyTorch path (compute_row_terms, "topk"), on peaked student rows (even rows peaked 60 above the rest
    on a slot) and a peaked teacher, rows without used slots, slot tiles smaller than k, fp32 and fp64."""
    from selfreplay_fast import _vocab_pass_torch

    tail_mass = torch.tensor([1e-6, 0.3, 1e-4, 0.05, 0.5, 0.2, 0.01], dtype=torch.float64)[:c]
    for case, (dtype, block_k, inv_temp) in enumerate([(torch.float32, None, 1.0), (torch.float32, 2, 0.37),
                                                        (torch.float64, None, 1.7)]):
        logits, ids = make_inputs(c, V, k, dtype=dtype, seed=case, peaked=True)
        lp, _, scale = make_teacher(ids, case, tail_mass)
        ref_loss, ref_grad = reference_topk(logits, ids, lp, inv_temp, scale)
        torch_loss = torch.empty(c, dtype=torch.float64, device=DEVICE)
        torch_grad = _vocab_pass_torch.topk_row_terms(slot_logits(logits, ids, inv_temp, torch.float64), ids, lp,
                                                      scale, torch_loss)
        z = slot_logits(logits, ids, inv_temp, dtype)
        loss = torch.empty(c, dtype=dtype, device=DEVICE)
        grad = vocab_pass.topk_row_terms(z, ids, lp.to(dtype), scale.to(dtype), loss, block_k=block_k)
        what = f"{dtype} block_k={block_k} inv_temp={inv_temp}"
        assert grad.dtype == dtype, what
        for name, expected in (("reference", (ref_loss, ref_grad)), ("compute_row_terms", (torch_loss, torch_grad))):
            assert_close(loss, expected[0], dtype, f"loss vs {name}, {what}")
            assert_close(grad, expected[1], dtype, f"grad_teacher vs {name}, {what}")
        if c > 1:
            assert loss[0] == 0 and (grad[0] == 0).all()  # no used slot: exact zeros
        assert (grad[-1] == 0).all() and (grad[ids < 0] == 0).all()  # a zero row scale, unused slots
        loss_only = torch.empty(c, dtype=dtype, device=DEVICE)
        assert vocab_pass.topk_row_terms(z, ids, lp.to(dtype), None, loss_only, block_k=block_k) is None
        assert torch.equal(loss_only, loss), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_row_terms_propagate_nan_and_inf_like_the_reference(dtype):
    """A NaN or +inf logit on a used slot, or every used slot at -inf, makes the row's loss NaN (as
    torch.log_softmax of the slots); a -inf slot is probability 0 (an infinite loss under teacher mass);
    a non-finite logit off the slots changes nothing; NaN gradients exactly where compute_row_terms has
    them. The other rows are untouched."""
    from selfreplay_fast import _vocab_pass_torch

    c, V, k = 8, 37, 5
    logits, ids = make_inputs(c, V, k, dtype=dtype, seed=13)
    slots = [ids[n][ids[n] >= 0].long() for n in range(c)]
    off = [next(v for v in range(V) if not (ids[n] == v).any()) for n in range(c)]
    logits[1, slots[1][0]] = float("nan")
    logits[2, slots[2][1]] = float("inf")
    logits[3, slots[3][0]] = NEG_INF
    logits[4, slots[4]] = NEG_INF  # every used slot
    logits[5, off[5]] = float("nan")  # off the slots: topk never reads it
    logits[6, slots[6][:2]] = float("inf")
    lp, _, scale = make_teacher(ids, 5, torch.full((c,), 0.2, dtype=torch.float64))
    scale[-1] = 1.0
    ref_loss, _ = reference_topk(logits, ids, lp, 1.0, scale)
    torch_loss = torch.empty(c, dtype=torch.float64, device=DEVICE)
    torch_grad = _vocab_pass_torch.topk_row_terms(slot_logits(logits, ids, 1.0, torch.float64), ids, lp, scale,
                                                  torch_loss)
    loss = torch.empty(c, dtype=dtype, device=DEVICE)
    grad = vocab_pass.topk_row_terms(slot_logits(logits, ids, 1.0, dtype), ids, lp.to(dtype), scale.to(dtype), loss,
                                     block_k=2)
    for expected in (ref_loss, torch_loss):
        torch.testing.assert_close(loss.double(), expected, **TOL[dtype], equal_nan=True)
    assert torch.isnan(loss[[1, 2, 4, 6]]).all() and loss[3] == float("inf")
    assert torch.isfinite(loss[[0, 5, 7]]).all()
    torch.testing.assert_close(grad.double(), torch_grad, **TOL[dtype], equal_nan=True)
    assert torch.equal(torch.isnan(grad), torch.isnan(torch_grad))
    assert torch.isfinite(grad[[0, 3, 5, 7]]).all()


def test_topk_row_terms_rejects_bad_arguments():
    logits, ids = make_inputs(3, 37, 3)
    z = slot_logits(logits, ids, 1.0, torch.float32)
    lp = torch.zeros(3, 3, device=DEVICE)
    loss = torch.empty(3, device=DEVICE)
    with pytest.raises(ValueError, match="z_teacher"):
        vocab_pass.topk_row_terms(z.half(), ids, lp, None, loss)
    with pytest.raises(ValueError, match="ids"):
        vocab_pass.topk_row_terms(z, ids[:, :2], lp, None, loss)
    with pytest.raises(ValueError, match="teacher_logprobs"):
        vocab_pass.topk_row_terms(z, ids, lp[:, :2], None, loss)
    with pytest.raises(ValueError, match="loss_out"):
        vocab_pass.topk_row_terms(z, ids, lp, None, loss[:2])
    with pytest.raises(ValueError, match="row_scale"):
        vocab_pass.topk_row_terms(z, ids, lp, loss[:2], loss)


@pytest.mark.parametrize("V", [33, 37, 64, 300, 301, 1000])
@pytest.mark.parametrize("logits_dtype,out_dtype", [(torch.float32, torch.bfloat16), (torch.float64, torch.float32),
                                                    (torch.float64, torch.bfloat16)])
def test_narrow_grad_layout_each_program_writes_only_what_it_has_read(V, logits_dtype, out_dtype):
    """The race-freedom argument of _softmax_grad_kernel, checked byte by byte for its tile order: every
    byte a program (row, split) stores lies in the logits columns that program reads, and in a column it
    has already loaded (this tile or an earlier one of its visiting order)."""
    logits = torch.empty(2, V, dtype=logits_dtype)
    out = vocab_pass.narrow_grad_view(logits, out_dtype, block_v=TILE)
    tile, width, splits = vocab_pass._grad_split_plan(V, logits.device, TILE)
    e_l, e_o = logits.element_size(), out.element_size()
    offset = out.storage_offset() * e_o - logits.storage_offset() * e_l  # bytes into each row
    assert splits == min(2, math.ceil(V / TILE))
    for split in range(splits):
        lo, hi = split * width, min((split + 1) * width, V)
        tiles = list(range(math.ceil((hi - lo) / tile)))
        if split == 0 and splits > 1:
            tiles.reverse()  # FIRST_SPLIT_BACKWARDS
        read = set()
        for t in tiles:
            cols = range(lo + t * tile, min(lo + (t + 1) * tile, hi))
            read.update(cols)
            for v in cols:  # out[row, v] occupies bytes [offset + v e_o, offset + (v + 1) e_o)
                first, last = (offset + v * e_o) // e_l, (offset + (v + 1) * e_o - 1) // e_l
                assert first in read and last in read, (split, t, v)


def test_narrow_grad_two_programs_per_row_on_peaked_odd_rows():
    """Two programs per row writing bf16 over the fp32 logits they read: equal to the separate-buffer
    result bit for bit on odd shapes with peaked softmaxes (one logit 60 above the rest)."""
    for c, V, k, seed in [(3, 301, 5, 0), (5, 97, 96, 1), (2, 1000, 17, 2)]:
        logits, ids = make_inputs(c, V, k, seed=seed, peaked=True, padded=False)
        scalars = row_scalars(*masked_lse(logits, ids, 0.37, block_v=TILE), seed)
        separate = softmax_grad(logits, ids, *scalars, 0.37, torch.empty(c, V, dtype=torch.bfloat16), block_v=TILE)
        assert vocab_pass._grad_split_plan(V, logits.device, TILE)[2] == 2
        inside = softmax_grad(logits, ids, *scalars, 0.37,
                              vocab_pass.narrow_grad_view(logits, torch.bfloat16, block_v=TILE), block_v=TILE)
        assert torch.equal(inside, separate) and separate.abs().max() > 0.1
    with pytest.raises(ValueError, match="narrow_grad_view"):  # the offset-0 layout would race with two programs
        logits, ids = make_inputs(3, 301, 5, seed=0)
        softmax_grad(logits, ids, *row_scalars(*masked_lse(logits, ids, 1.0, block_v=TILE), 0), 1.0,
                     logits.view(torch.bfloat16)[:, :301], block_v=TILE)
