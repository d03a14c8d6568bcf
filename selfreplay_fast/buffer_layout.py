"""How the tensors of one shard are laid out on disk: format v2 (ragged, narrow ids) and format v1 (padded).

A ``ReplayBuffer`` holds its sequences padded to ``[S, L]`` in memory (training batches are padded anyway).
On disk, format v2 stores them **ragged**: every per-position tensor is flat over the shard's ``T`` real
tokens, sequence after sequence (sequence ``i`` is rows ``offsets[i] .. offsets[i + 1] - 1``, ``offsets``
the running sum of ``lengths``), so no byte is spent on padding:

* ``lengths`` [S] int64;
* ``tokens`` [T] uint16 when ``V <= 65536``, else int32;
* ``teacher_ids`` [T, k] uint16 holding ``id + 1`` (0 marks an unused slot, the ``-1`` of memory) modulo
  2^16, and, when ``V + 1 > 65536`` (``V >= 65536``), ``teacher_ids_high`` [T, b * ceil(k / 8)] uint8: the
  ``b = bits(V) - 16`` high bits of ``id + 1``, bit-packed 8 slots per byte (1 bit for V up to 131071, e.g.
  Llama 3's 128256). An id costs 17 bits there instead of the 32 of an int32;
* ``teacher_logprobs`` [T, k] and ``teacher_tail_logprob`` [T] in the buffer's log-prob dtype (float16 by
  default for generated buffers; see docs/design.md for its effect on the loss);
* ``sampled_logprobs`` [T] float32, when the buffer records it: at row ``j`` the original model's log-prob
  of token ``j + 1`` (0 where row ``j`` has no teacher).

At k = 64 and V = 128256 with float16 log-probs that is 4 + 128 + 8 + 128 + 2 + 4 = 274 bytes per token
(:func:`bytes_per_token`), against 4 * 64 + 4 * 64 + 8 + 4 = 524 plus padding in format v1, where every
tensor is ``[S, L(, k)]``, ids int32 and tokens int64 (kept readable and writable: :func:`pack_v1`).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

_LOW_BITS = 16


def id_high_bits(vocab_size: int) -> int:
    """High bits of ``id + 1`` beyond the uint16 part (0 when every ``id + 1`` in ``[0, V]`` fits 16 bits)."""
    return max(0, int(vocab_size).bit_length() - _LOW_BITS)


def token_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type of a token id in ``[0, V)``."""
    return torch.uint16 if vocab_size <= 1 << _LOW_BITS else torch.int32


def bytes_per_token(vocab_size: int, k: int, logprob_dtype: torch.dtype, *, sampled_logprobs: bool) -> float:
    """Bytes of tensor data per token of a format-v2 shard (8 more per sequence for its length)."""
    lp = torch.empty((), dtype=logprob_dtype).element_size()
    total = torch.empty((), dtype=token_dtype(vocab_size)).element_size() + 2 * k
    total += id_high_bits(vocab_size) * (-(-k // 8)) + lp * (k + 1)
    return float(total + (4 if sampled_logprobs else 0))


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[T, k] of 0/1 -> [T, ceil(k / 8)] uint8, slot ``8 c + i`` in bit ``i`` of byte ``c``."""
    t, k = bits.shape
    pad = (-k) % 8
    grouped = torch.nn.functional.pad(bits.to(torch.int32), (0, pad)).view(t, -1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int32)
    return (grouped * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, k: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32)
    bits = (packed.to(torch.int32)[..., None] >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :k]


def pack_ids(ids: torch.Tensor, vocab_size: int) -> Dict[str, torch.Tensor]:
    """Teacher ids [T, k] (-1 = unused) -> ``teacher_ids`` (+ ``teacher_ids_high``), see the module docstring."""
    shifted = ids.to(torch.int64) + 1
    out = {"teacher_ids": (shifted & 0xFFFF).to(torch.int32).to(torch.uint16)}
    high = id_high_bits(vocab_size)
    if high:
        out["teacher_ids_high"] = torch.cat(
            [_pack_bits((shifted >> (_LOW_BITS + b)) & 1) for b in range(high)], dim=1)
    return out


def unpack_ids(low: torch.Tensor, high: Optional[torch.Tensor], vocab_size: int, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_ids`: int32 [T, k], -1 on unused slots."""
    shifted = low.to(torch.int64)
    bits = id_high_bits(vocab_size)
    if bits:
        width = -(-k // 8)
        for b in range(bits):
            shifted |= _unpack_bits(high[:, b * width : (b + 1) * width], k).to(torch.int64) << (_LOW_BITS + b)
    return (shifted - 1).to(torch.int32)


def v2_tensor_names(vocab_size: int, sampled_logprobs: bool) -> tuple:
    names = ["lengths", "tokens", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"]
    if id_high_bits(vocab_size):
        names.append("teacher_ids_high")
    if sampled_logprobs:
        names.append("sampled_logprobs")
    return tuple(names)


def pack_v2(padded: Dict[str, torch.Tensor], vocab_size: int) -> Dict[str, torch.Tensor]:
    """Padded shard tensors (``input_ids`` [S, L], ``lengths``, ``teacher_*`` [S, L(, k)], optionally
    ``sampled_logprobs`` [S, L]) -> the ragged format-v2 tensors."""
    lengths = padded["lengths"].to(torch.int64)
    width = padded["input_ids"].shape[1]
    real = torch.arange(width)[None, :] < lengths[:, None]  # row-major: sequence after sequence
    out = {
        "lengths": lengths,
        "tokens": padded["input_ids"][real].to(torch.int32).to(token_dtype(vocab_size)),
        **pack_ids(padded["teacher_ids"][real], vocab_size),
        "teacher_logprobs": padded["teacher_logprobs"][real],
        "teacher_tail_logprob": padded["teacher_tail_logprob"][real],
    }
    if padded.get("sampled_logprobs") is not None:
        out["sampled_logprobs"] = padded["sampled_logprobs"][real].to(torch.float32)
    return out


def scatter_ragged(flat: torch.Tensor, lengths: torch.Tensor, width: int, fill) -> torch.Tensor:
    """Flat rows [T, ...] of sequences of ``lengths`` (each at most ``width``) -> [S, width, ...] padded
    with ``fill``."""
    real = torch.arange(width)[None, :] < lengths.to(torch.int64)[:, None]
    out = torch.full((lengths.numel(), width, *flat.shape[1:]), fill, dtype=flat.dtype)
    out[real] = flat
    return out


def unpack_v2(tensors: Dict[str, torch.Tensor], vocab_size: int, k: int, pad_token_id: int,
              width: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Ragged format-v2 tensors (checked) -> the padded ``ReplayBuffer`` tensors, ``width`` columns wide
    (default: the longest sequence)."""
    lengths = tensors["lengths"].to(torch.int64)
    if width is None:
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
    ids = unpack_ids(tensors["teacher_ids"], tensors.get("teacher_ids_high"), vocab_size, k)
    out = {
        "input_ids": scatter_ragged(tensors["tokens"].to(torch.int64), lengths, width, pad_token_id),
        "lengths": lengths,
        "teacher_ids": scatter_ragged(ids, lengths, width, -1),
        "teacher_logprobs": scatter_ragged(tensors["teacher_logprobs"], lengths, width, 0.0),
        "teacher_tail_logprob": scatter_ragged(tensors["teacher_tail_logprob"], lengths, width, float("-inf")),
    }
    if "sampled_logprobs" in tensors:
        out["sampled_logprobs"] = scatter_ragged(tensors["sampled_logprobs"], lengths, width, 0.0)
    return out


def pack_v1(padded: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The format-v1 tensors: padded, ids int32, tokens int64 (no sampled log-probs: v1 has no field)."""
    return {"input_ids": padded["input_ids"].to(torch.int64), "lengths": padded["lengths"].to(torch.int64),
            "teacher_ids": padded["teacher_ids"].to(torch.int32), "teacher_logprobs": padded["teacher_logprobs"],
            "teacher_tail_logprob": padded["teacher_tail_logprob"]}
