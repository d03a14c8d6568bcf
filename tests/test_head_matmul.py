"""The Triton head matmul over fp32 master weights (kernels/head_matmul.py), and the fused KL path that
launches it (autocast over an fp32 lm_head, impl="triton").

References: the float64 product of the operands autocast would form (the weight rounded to the 16-bit
dtype by torch), and the PyTorch path with its 16-bit copy of the weight. Without a GPU the kernel runs
under the Triton interpreter (tests/conftest.py), so shapes are small and odd: tile edges in every
dimension, one-element matrices, strided operands (the gradient lives in the logits' storage).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import selfreplay_fast as sf
from selfreplay_fast import replay_kl as rk
from selfreplay_fast._inputs import prepare_replay_kl_inputs
from selfreplay_fast.kernels import head_matmul as hm

from replay_cases import make_case, rel_err, run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIXTEEN = [torch.bfloat16, torch.float16]
# (M, K, N): below, at and past the 128 x 128 output tile and the 32-wide reduction step
SHAPES = [(1, 1, 1), (5, 40, 300), (130, 17, 129), (3, 65, 7)]


def _operands(m, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).to(dtype)
    weight = torch.randn(n, k, generator=g) * 3  # fp32 [N, K], as an lm_head [V, D]
    bias = torch.randn(n, generator=g)
    return a.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)


def _reference(a, w, dtype, bias=None):
    """float64 a @ round(w) (+ bias), round = torch's conversion to the 16-bit dtype."""
    out = a.double().cpu() @ w.to(dtype).double().cpu()
    return out + bias.double().cpu() if bias is not None else out


@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("shape", SHAPES)
def test_logits_layout_with_bias_matches_float64(dtype, shape):
    """x = h Wᵀ + b with fp32 output: exact products of the rounded operands, fp32 accumulation."""
    m, k, n = shape
    h, weight, bias = _operands(m, k, n, dtype, seed=m + k + n)
    for b in (None, bias):
        out = torch.full((m, n), float("nan"), device=DEVICE)
        assert hm.head_matmul(h, weight.T, out, bias=b) is out
        expected = _reference(h, weight.T, dtype, b)
        assert rel_err(out.double().cpu(), expected) <= 1e-6
        assert (out.double().cpu() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("shape", SHAPES)
def test_grad_hidden_layout_from_a_strided_gradient(dtype, shape):
    """G W with G in the first half of an fp32 buffer's rows (row stride 2N, as in the logits' storage)
    and a 16-bit output: the fp32 sum rounded once, so within one 16-bit ulp of the float64 product."""
    m, n, k = shape  # G [M, V = n], W [V, D = k]
    g, weight_t, _ = _operands(m, n, k, dtype, seed=7 * m + n)
    weight = weight_t.T.contiguous()
    storage = torch.zeros(m, n, dtype=torch.float32, device=DEVICE)
    strided = storage.view(dtype)[:, :n]
    strided.copy_(g)
    out = torch.empty(m, k, dtype=dtype, device=DEVICE)
    hm.head_matmul(strided, weight, out)
    expected = _reference(g, weight, dtype)
    ulp = 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
    assert ((out.double().cpu() - expected).abs() <= ulp * expected.abs() + 1e-30).all()


@pytest.mark.parametrize("dtype", SIXTEEN)
def test_weight_is_rounded_to_nearest_even_as_torch_does(dtype):
    """With A = I the product is the rounded weight itself: bitwise torch's conversion, at halfway
    points (ties to even), just off them, and for subnormal 16-bit results."""
    mantissa = 7 if dtype == torch.bfloat16 else 10
    base = torch.tensor([1.0, 1.5, -3.0, 2.0**-10, 100.0])
    half_ulp = base.abs() * 2.0 ** -(mantissa + 1)
    values = torch.cat([base + half_ulp, base - half_ulp, base + 1.01 * half_ulp, base + 3 * half_ulp,
                        base + 0.99 * half_ulp, torch.tensor([1e-6, -3e-7, 2e-40, 0.0])])
    n = values.numel()
    weight = values.reshape(n, 1).expand(n, 3).contiguous().to(DEVICE)  # [N, K = 3]
    out = torch.empty(3, n, device=DEVICE)
    hm.head_matmul(torch.eye(3, dtype=dtype, device=DEVICE), weight.T, out)
    assert torch.equal(out.cpu(), weight.T.cpu().to(dtype).float())


def test_bad_arguments_are_rejected():
    a = torch.zeros(2, 3, dtype=torch.bfloat16)
    w = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="a must be a 2-D tensor of torch.bfloat16 or torch.float16"):
        hm.head_matmul(a.float(), w, torch.empty(2, 4))
    with pytest.raises(ValueError, match="w must be a 2-D tensor of torch.float32"):
        hm.head_matmul(a, w.to(torch.bfloat16), torch.empty(2, 4))
    with pytest.raises(ValueError, match="shapes do not multiply"):
        hm.head_matmul(a, torch.zeros(4, 4), torch.empty(2, 4))
    with pytest.raises(ValueError, match="out must have a contiguous last dim"):
        hm.head_matmul(a, w, torch.empty(4, 2).T)
    with pytest.raises(ValueError, match=r"bias must be a contiguous \[4\] tensor"):
        hm.head_matmul(a, w, torch.empty(2, 4), bias=torch.zeros(5))


# --- the fused KL path that launches it --------------------------------------------------------------


def _autocast_kl(impl, chunk_size, dtype=torch.bfloat16):
    def kl(*args, **kwargs):
        with torch.autocast(DEVICE, dtype=dtype):
            inp = prepare_replay_kl_inputs(*args, **kwargs)
            return rk._apply(inp, impl, chunk_size, low_precision=True)  # CUDA's 16-bit matmul arithmetic

    return kl


class _Conversions(TorchDispatchMode):
    """(input shape, input dtype, output dtype) of every dtype conversion (aten._to_copy)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "_to_copy":
            self.made.append((tuple(args[0].shape), args[0].dtype, out.dtype))
        return out


@pytest.mark.parametrize("mode,reduction,bias", [("tail", "mean", True), ("sampled", "sum", False),
                                                 ("tail", "none", False), ("topk", "mean", True)])
def test_fp32_master_autocast_matches_the_weight_copy_path_and_float64(mode, reduction, bias, monkeypatch):
    """Autocast over fp32 master weights, impl="triton": the same loss and gradients as the same
    dispatcher with a 16-bit copy of the weight and library matmuls (the path before the kernel; only
    the accumulation order differs), within bf16's tolerance of float64, and the weight is never
    converted to 16 bits as a whole."""
    case = make_case((3, 7), 70, 131, 6, mode, seed=41, bias=bias)
    with _Conversions() as triton_path:
        got = run(_autocast_kl("triton", 8), case, torch.float32, DEVICE, reduction)
    head_matmuls = rk._HeadMatmuls
    monkeypatch.setattr(rk, "_HeadMatmuls", lambda *args, triton_matmul: head_matmuls(*args, triton_matmul=False))
    with _Conversions() as torch_path:
        copy_path = run(_autocast_kl("triton", 8), case, torch.float32, DEVICE, reduction)
    ref = run(sf.reference_replay_kl, case, torch.float64, "cpu", reduction)
    weight_copy = ((131, 70), torch.float32, torch.bfloat16)
    assert weight_copy in torch_path.made and weight_copy not in triton_path.made
    assert got[2].dtype == torch.float32
    for name, a, c, e in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], got, copy_path, ref):
        if e is None:
            assert a is None and c is None
            continue
        # Measured under the interpreter: loss within 4e-8, gradients bitwise equal. On a GPU the two
        # accumulation orders may round a few logits' bf16 gradient the other way (2^-8 each).
        assert rel_err(a.cpu(), c.cpu()) <= (1e-6 if name == "loss" else 1e-3), name
        assert rel_err(a.cpu(), e) <= 2e-2, name


def test_fp32_master_autocast_launches_the_head_matmul(monkeypatch):
    """Both matmuls that read the weight go through the kernel (fp16 autocast: recomputed in backward,
    so forward runs the logits and backward both again); the weight-gradient matmul does not."""
    calls = []
    original = hm.head_matmul

    def spy(a, w, out, bias=None):
        calls.append((tuple(a.shape), tuple(w.shape), out.dtype))
        return original(a, w, out, bias=bias)

    monkeypatch.setattr(hm, "head_matmul", spy)
    case = make_case((10,), 16, 45, 4, "tail", seed=3)
    got = run(_autocast_kl("triton", 4, torch.float16), case, torch.float32, DEVICE, "mean")
    ref = run(sf.reference_replay_kl, case, torch.float64, "cpu", "mean")
    assert [c for c in calls if c[2] == torch.float32] == [((4, 16), (16, 45), torch.float32)] * 2 \
        + [((2, 16), (16, 45), torch.float32)] + [((4, 16), (16, 45), torch.float32)] * 2 \
        + [((2, 16), (16, 45), torch.float32)]
    assert [c for c in calls if c[2] == torch.float16] == [((4, 45), (45, 16), torch.float16)] * 2 \
        + [((2, 45), (45, 16), torch.float16)]
    for a, e in zip(got, ref):
        if e is not None:
            assert rel_err(a.cpu(), e) <= 2e-2
