"""Top-k log-probabilities of the full softmax, for teacher caches of existing text.

``topk_logprobs(logits, k)`` returns, for every row of ``logits [N, V]``:

* ``ids [N, k]`` int32: the k largest logits' vocabulary ids, best first;
* ``logprobs [N, k]`` float32: their log-probabilities, normalized over the *full* vocabulary;
* ``tail [N]`` float32: the log of the probability mass outside the top k, computed as a log-sum-exp
  of the other logits minus the full log-sum-exp (accurate when the top k hold almost all the mass;
  never ``log(1 - sum(exp(logprobs)))``); ``-inf`` when ``k == V``.

The compiled extension (``selfreplay_fast._C``, csrc/) does this in one streaming pass per row: it
reads every logit once and writes only ``N * (2k + 1)`` values, where torch's ``log_softmax`` +
``topk`` materialize and re-read ``[N, V]``. Without the extension (or for a device it has no kernel
for) a torch implementation with exactly the same semantics runs instead, with one warning per process.

Semantics shared by both paths:

* Ties: among equal logits the lower id ranks first, so the chosen ids and their order are
  deterministic. (``torch.topk`` leaves ties unordered: comparing with it, compare the id *sets* of
  the strictly larger logits, or the log-prob values, which ties cannot change.)
* A row whose logits are all ``-inf`` has no distribution: NaN log-probs and tail (as
  ``torch.log_softmax``). A row with a NaN or ``+inf`` logit gives NaN log-probs and tail; its ids are
  valid ids but otherwise unspecified.
* The outputs are not differentiable (teacher caches come from a frozen model).

``linear_topk_logprobs(hidden, weight, k)`` applies the same to ``hidden @ weight.T (+ bias)`` in
chunks of tokens, so that at most ``chunk_size x V`` logits exist at any time.
"""

from __future__ import annotations

import numbers
import os
import threading
import warnings
from typing import Optional, Tuple

import torch

from ._inputs import _require_tensor, check_chunk_size

__all__ = ["extension_available", "topk_logprobs", "linear_topk_logprobs"]

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LINEAR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# linear_topk_logprobs' default chunk: this many fp32 logits (128 MiB) divided by V.
DEFAULT_CHUNK_LOGITS = 1 << 25
# The torch path works through row chunks of this many logits: it needs a float copy of the chunk with
# the top k masked (plus a float copy of 16-bit input), so 64 to 128 MiB.
_TORCH_PATH_CHUNK_LOGITS = 1 << 24
_INT32_MAX = 2**31 - 1


def _load_extension():
    """(the compiled module or None, why it is None). None when it was not built, does not load (built
    against another torch, say), or SELFREPLAY_FAST_DISABLE_EXTENSION=1."""
    if os.environ.get("SELFREPLAY_FAST_DISABLE_EXTENSION", "").strip() in ("1", "true", "yes"):
        return None, "SELFREPLAY_FAST_DISABLE_EXTENSION is set"
    try:
        from . import _C  # registers torch.ops.selfreplay_fast.topk_logprobs
    except ImportError as exc:
        return None, str(exc)
    return _C, None


# Module-level so tests (and users) can switch the extension off: topk._EXTENSION = None.
_EXTENSION, _EXTENSION_ERROR = _load_extension()
_fallback_warned = False
_warn_lock = threading.Lock()


def extension_available() -> bool:
    """Whether the compiled extension selfreplay_fast._C is loaded (``pip install --no-build-isolation
    -e .`` with torch installed builds it)."""
    return _EXTENSION is not None


def _warn_fallback_once(reason: str) -> None:
    global _fallback_warned
    with _warn_lock:
        if _fallback_warned:
            return
        _fallback_warned = True
    warnings.warn(
        f"selfreplay_fast.topk_logprobs: {reason}; using the torch implementation (same results, several "
        "passes over [N, V] temporaries). This warning is shown once per process.",
        RuntimeWarning,
        stacklevel=3,
    )


def _check_k(k, vocab: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > vocab:
        raise ValueError(f"k ({k}) must be <= the vocabulary size V ({vocab})")
    return k


def _check_logits(logits) -> None:
    _require_tensor("logits", logits, dtypes=LOGITS_DTYPES, what="a float32, bfloat16 or float16 tensor")
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, V], got shape {tuple(logits.shape)}")
    vocab = logits.shape[1]
    if vocab < 1:
        raise ValueError(f"logits must have a non-empty vocabulary dimension, got shape {tuple(logits.shape)}")
    if vocab > _INT32_MAX:
        raise ValueError(f"logits has V = {vocab} columns; ids are int32, so V must be < 2^31")
    if not logits.is_contiguous():
        raise ValueError(
            "logits must be contiguous (call .contiguous() first: copying an [N, V] tensor is left to the "
            f"caller), got strides {logits.stride()} for shape {tuple(logits.shape)}"
        )


def _extension_route(logits: torch.Tensor, k: int) -> Tuple[bool, Optional[str]]:
    """(use the extension?, why not, when that deserves the one-time warning)."""
    if _EXTENSION is None:
        return False, f"the compiled extension selfreplay_fast._C is not available ({_EXTENSION_ERROR or 'disabled'})"
    device = logits.device.type
    if device in ("cpu", "meta"):
        return True, None
    if device == "cuda":
        if not _EXTENSION.has_cuda():
            return False, "the compiled extension was built without CUDA"
        # The CUDA kernel keeps its candidates in shared memory; larger k is a documented torch path.
        return k <= _EXTENSION.cuda_max_k(), None
    return False, f"the compiled extension has no kernel for device type {device!r}"


def topk_logprobs(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, their full-vocabulary log-probs and the log tail mass of every row of ``logits``.

    logits: [N, V] float32, bfloat16 or float16, contiguous, on any device (CPU and CUDA have compiled
    kernels). k: 1 <= k <= V. Returns ``(ids [N, k] int32, logprobs [N, k] float32, tail [N] float32)``
    on the device of ``logits``, sorted best first; see the module docstring for ties and non-finite
    logits. Raises TypeError / ValueError naming the bad argument.
    """
    _check_logits(logits)
    k = _check_k(k, logits.shape[1])
    logits = logits.detach()
    use_extension, reason = _extension_route(logits, k)
    if use_extension:
        ids, logprobs, tail = torch.ops.selfreplay_fast.topk_logprobs(logits, k)
        return ids, logprobs, tail
    if reason is not None:
        _warn_fallback_once(reason)
    return _topk_logprobs_torch(logits, k)


def _topk_logprobs_torch(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch implementation, with the extension's exact semantics (ties to the lower id included).
    Works through row chunks of about _TORCH_PATH_CHUNK_LOGITS logits to bound its temporaries."""
    n, vocab = logits.shape
    device = logits.device
    ids = torch.empty((n, k), dtype=torch.int32, device=device)
    logprobs = torch.empty((n, k), dtype=torch.float32, device=device)
    tail = torch.empty((n,), dtype=torch.float32, device=device)
    rows_per_chunk = max(1, _TORCH_PATH_CHUNK_LOGITS // vocab)
    for start in range(0, n, rows_per_chunk):
        x = logits[start : start + rows_per_chunk].float()
        values, chosen = _top_k_lowest_ids_first(x, k)
        # One pass over [rows, V] for the log-sum-exps: the tail's own (the stable way to get a tiny
        # tail), and the full one as its log-add with the k selected logits.
        tail_lse = torch.logsumexp(x.scatter(1, chosen, float("-inf")), dim=-1)
        lse = torch.logaddexp(tail_lse, torch.logsumexp(values, dim=-1))
        # A +inf logit makes the distribution undefined: NaN everywhere, as the compiled kernels give.
        # (NaN logits make lse NaN by themselves; the ids of such rows are left to torch.topk.)
        lse = torch.where(lse == float("inf"), float("nan"), lse)
        rows = slice(start, start + x.shape[0])
        ids[rows] = chosen.to(torch.int32)
        logprobs[rows] = values - lse[:, None]
        tail[rows] = tail_lse - lse
    return ids, logprobs, tail


def _top_k_lowest_ids_first(x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """torch.topk with the library's tie rule: sorted by (value desc, id asc), and where more logits
    equal the k-th value than fit, the lowest ids among them are the ones kept."""
    vocab = x.shape[1]
    # One extra value tells whether a tie crosses the boundary: the (k+1)-th largest equals the k-th.
    values, chosen = torch.topk(x, min(k + 1, vocab), dim=-1, sorted=True)
    if k < vocab:
        tied = values[:, k] == values[:, k - 1]
        values, chosen = values[:, :k], chosen[:, :k]
    else:
        tied = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    # Order within the top k: sort by id, then stably by value.
    chosen, by_id = chosen.sort(dim=-1)
    values, order = values.gather(1, by_id).sort(dim=-1, descending=True, stable=True)
    chosen = chosen.gather(1, order)
    # Rows where torch.topk had to choose among logits equal to the k-th value (rare with real-valued
    # logits) are redone: everything above the boundary, then the lowest ids at it.
    boundary = values[:, -1:]
    if tied.any():
        rows = tied.nonzero().flatten()
        sub, sub_boundary = x[rows], boundary[rows]
        above = sub > sub_boundary
        at = sub == sub_boundary
        slots_left = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)
        selected = above | (at & (at.cumsum(dim=-1, dtype=torch.int32) <= slots_left))
        sub_chosen = selected.nonzero()[:, 1].view(-1, k)  # exactly k per row, increasing ids
        sub_values, order = sub.gather(1, sub_chosen).sort(dim=-1, descending=True, stable=True)
        values[rows] = sub_values
        chosen[rows] = sub_chosen.gather(1, order)
    return values, chosen


def _check_linear_inputs(hidden, weight, bias) -> None:
    what = "a floating tensor (float32, bfloat16, float16 or float64)"
    _require_tensor("hidden", hidden, dtypes=LINEAR_DTYPES, what=what)
    _require_tensor("weight", weight, dtypes=LINEAR_DTYPES, what=what)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, D] and weight [V, D] must share D, got hidden {tuple(hidden.shape)} and weight "
            f"{tuple(weight.shape)}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"hidden ({hidden.device}) and weight ({weight.device}) must be on the same device")
    if bias is not None:
        _require_tensor("bias", bias, dtypes=LINEAR_DTYPES, what=what)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError(f"bias ({bias.device}) must be on the device of weight ({weight.device})")


def _matmul_operand_dtype(hidden, weight, compute_dtype) -> torch.dtype:
    """Operand dtype of the logits matmuls. A 16-bit hidden and weight of one dtype on a GPU stay 16-bit,
    with fp32 output (tensor cores, fp32 accumulation: no fp32 copy of the weight, no fp32 matmul);
    elsewhere (CPU: no 16-bit x 16-bit -> fp32 matmul) both are upcast. Mixed 16-bit / fp32 operands on
    a GPU run fp32 matmuls, as torch's promotion would: warned, since it is a large slowdown."""
    sixteen = (torch.float16, torch.bfloat16)
    on_gpu = hidden.device.type in ("cuda", "meta")  # meta: shapes only, as CUDA
    if on_gpu and hidden.dtype == weight.dtype and hidden.dtype in sixteen and "dtype" in torch.ops.aten.mm.overloads():
        return hidden.dtype
    if on_gpu and hidden.device.type == "cuda" and compute_dtype == torch.float32 and (
            hidden.dtype in sixteen or weight.dtype in sixteen):
        warnings.warn(
            f"linear_topk_logprobs: hidden is {hidden.dtype} and weight is {weight.dtype}: the logits run as "
            "fp32 matmuls (an fp32 copy of the 16-bit operand), far below the 16-bit tensor-core rate. Pass "
            "both in the same 16-bit dtype (logits are accumulated in fp32 either way).",
            stacklevel=3,
        )
    return compute_dtype


def linear_topk_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``topk_logprobs(hidden @ weight.T + bias, k)`` without ever holding the [N, V] logits.

    hidden: [N, D]; weight: [V, D] (an LM head); bias: optional [V]. Tokens are processed in chunks of
    ``chunk_size`` rows (default: about DEFAULT_CHUNK_LOGITS / V), so at most ``chunk_size x V`` fp32
    logits are alive. Logits are computed in float32 (float64 if an input is float64, then rounded):
    on a GPU, 16-bit hidden and weight of one dtype are multiplied as they are with fp32 output; otherwise
    16-bit inputs are upcast, ``hidden`` per chunk and ``weight`` once per call (a V x D float32 copy,
    the same peak as upcasting it per chunk, without repeating the conversion; mixed 16-bit / fp32 inputs
    on a GPU warn). Returns ``(ids [N, k]
    int32, logprobs [N, k] float32, tail [N] float32)`` as topk_logprobs does.
    """
    _check_linear_inputs(hidden, weight, bias)
    vocab = weight.shape[0]
    k = _check_k(k, vocab)
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_LOGITS // vocab)

    n = hidden.shape[0]
    device = hidden.device
    compute_dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    ids = torch.empty((n, k), dtype=torch.int32, device=device)
    logprobs = torch.empty((n, k), dtype=torch.float32, device=device)
    tail = torch.empty((n,), dtype=torch.float32, device=device)
    operand_dtype = _matmul_operand_dtype(hidden, weight, compute_dtype)
    fp32_out = {} if operand_dtype == compute_dtype else {"out_dtype": compute_dtype}
    with torch.no_grad():
        weight_t = weight.to(operand_dtype).t()
        bias_c = None if bias is None else bias.to(compute_dtype)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size].to(operand_dtype)
            logits = (torch.mm(h, weight_t, **fp32_out) if bias_c is None
                      else torch.addmm(bias_c, h, weight_t, **fp32_out))
            chunk_ids, chunk_logprobs, chunk_tail = topk_logprobs(logits.float().contiguous(), k)
            del logits  # free this chunk's logits before the next matmul allocates its own
            rows = slice(start, start + h.shape[0])
            ids[rows] = chunk_ids
            logprobs[rows] = chunk_logprobs
            tail[rows] = chunk_tail
    return ids, logprobs, tail
