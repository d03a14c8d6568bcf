"""A replay buffer as a Hugging Face ``datasets.Dataset`` (Arrow: memory-mapped, streamable, shareable on
the Hub) and back: :meth:`ReplayBuffer.to_dataset` and :meth:`ReplayBuffer.from_dataset`.

One row per sequence, every column cut to the sequence's length (no padding):

* ``input_ids`` list<int32>; ``teacher_ids`` list<list<int32>> (k per position, -1 = unused slot);
* ``teacher_logprobs`` list<list<float16|float32>> and ``teacher_tail_logprob`` list<float16|float32>, in
  the buffer's log-prob dtype (exact round trip);
* ``sampled_logprobs`` list<float32>, when the buffer records it.

The buffer's metadata (``describe()``) travels as JSON in ``dataset.info.description``, with
``content_sha256``: the sha256 of the rows as the format-v2 shard tensors would hold them. ``from_dataset``
runs the checks of ``ReplayBuffer.open``: a metadata of the right format and fields, the expected
vocabulary, a complete buffer, the content digest (unless ``verify_checksum=False``, for a dataset whose
rows were changed on purpose), every column's type and shape, and :meth:`ReplayBuffer.validate`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import numpy as np
import torch

from .buffer_files import FORMAT_NAME, LOGPROB_DTYPES, MODES, SAMPLED_FIELD, ReplayBufferError
from .buffer_layout import pack_v2, scatter_ragged

_DIGEST = "content_sha256"
_ROWS_PER_BATCH = 1024


def _content_digest(buffer) -> str:
    digest = hashlib.sha256()
    packed = pack_v2(buffer._tensors(), buffer.vocab_size)
    for name in sorted(packed):
        digest.update(name.encode() + b"\0" + packed[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def to_dataset(buffer):
    """See :meth:`ReplayBuffer.to_dataset`."""
    import datasets

    lp_type = str(buffer.teacher_logprobs.dtype).replace("torch.", "")
    features = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "teacher_ids": datasets.List(datasets.List(datasets.Value("int32"))),
        "teacher_logprobs": datasets.List(datasets.List(datasets.Value(lp_type))),
        "teacher_tail_logprob": datasets.List(datasets.Value(lp_type)),
    }
    if buffer.sampled_logprobs is not None:
        features[SAMPLED_FIELD] = datasets.List(datasets.Value("float32"))
    features = datasets.Features(features)
    meta = {key: value for key, value in buffer.describe().items() if key != "shards"}
    meta.update(num_sequences=len(buffer), num_tokens=buffer.num_tokens, complete=True)
    meta[_DIGEST] = _content_digest(buffer)
    info = datasets.DatasetInfo(description=json.dumps(meta, sort_keys=True), features=features)

    def rows():
        for i, n in enumerate(buffer.lengths.tolist()):
            row = {"input_ids": buffer.input_ids[i, :n].numpy().astype(np.int32),
                   "teacher_ids": buffer.teacher_ids[i, :n].numpy(),
                   "teacher_logprobs": buffer.teacher_logprobs[i, :n].numpy(),
                   "teacher_tail_logprob": buffer.teacher_tail_logprob[i, :n].numpy()}
            if buffer.sampled_logprobs is not None:
                row[SAMPLED_FIELD] = buffer.sampled_logprobs[i, :n].numpy()
            yield row

    return datasets.Dataset.from_generator(rows, features=features, info=info)


def _dataset_metadata(dataset, metadata: Optional[dict]) -> dict:
    if metadata is None:
        text = getattr(getattr(dataset, "info", None), "description", None) or ""
        try:
            metadata = json.loads(text)
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            raise ReplayBufferError("dataset: its info.description holds no replay-buffer metadata (it was not made "
                                    "by ReplayBuffer.to_dataset, or lost its info); pass metadata= explicitly")
    if metadata.get("format") != FORMAT_NAME:
        raise ReplayBufferError(f"dataset: its metadata does not describe a selfreplay-fast replay buffer "
                                f"(format {str(metadata.get('format'))[:60]!r})")
    for field, check, expected in (
            ("vocab_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
            ("k", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
            ("mode", lambda v: v in MODES, f"one of {list(MODES)}"),
            ("logprob_dtype", lambda v: v in LOGPROB_DTYPES, f"one of {list(LOGPROB_DTYPES)}"),
            ("pad_token_id", lambda v: isinstance(v, int) and not isinstance(v, bool), "an int")):
        if not check(metadata.get(field)):
            raise ReplayBufferError(f"dataset: metadata field {field!r} must be {expected}, got "
                                    f"{json.dumps(metadata.get(field))[:80]}")
    return metadata


def _column(table, name, depth, dtype, k=None):
    """(flat values [T(, k)] as a tensor, lengths [S]) of a list column (``depth`` 2: list of lists of k)."""
    import pyarrow as pa

    column = table.column(name).combine_chunks()
    if isinstance(column, pa.ChunkedArray):  # an empty table combines to a chunked array of no chunks
        column = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], type=column.type)
    lengths = np.diff(np.asarray(column.offsets)) if len(column) else np.zeros(0, dtype=np.int64)
    values = column.flatten()
    if depth == 2:
        inner = np.diff(np.asarray(values.offsets)) if len(values) else np.zeros(0, dtype=np.int64)
        if (inner != k).any():
            raise ReplayBufferError(f"dataset: column {name!r} must hold k = {k} values at every position")
        values = values.flatten()
    flat = torch.from_numpy(np.asarray(values.to_numpy(zero_copy_only=False)).copy())
    # Other widths are accepted (a dataset built with inferred types holds int64 and float64): ids that fit,
    # values rounded to the buffer's dtype (exact for what to_dataset wrote, whose types are these).
    if dtype.is_floating_point != flat.dtype.is_floating_point or flat.dtype == torch.bool:
        raise ReplayBufferError(f"dataset: column {name!r} holds {flat.dtype}, expected {dtype}")
    if not dtype.is_floating_point and flat.numel() and (int(flat.min()) < -1 or int(flat.max()) > 2**31 - 1):
        raise ReplayBufferError(f"dataset: column {name!r} holds ids outside [-1, 2^31)")
    flat = flat.to(dtype)
    return (flat.view(-1, k) if depth == 2 else flat), torch.from_numpy(lengths.astype(np.int64))


def from_dataset(cls, dataset, *, metadata: Optional[dict] = None, expected_vocab_size: Optional[int] = None,
                 verify_checksum: bool = True, validate: bool = True):
    """See :meth:`ReplayBuffer.from_dataset`."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - the optional extra
        raise ImportError("ReplayBuffer.from_dataset needs the datasets package: pip install selfreplay-fast[datasets]") from exc
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if expected_vocab_size is not None and (
            isinstance(expected_vocab_size, bool) or not isinstance(expected_vocab_size, int) or expected_vocab_size < 1):
        raise ValueError(f"expected_vocab_size must be a positive int or None, got {expected_vocab_size!r}")
    meta = _dataset_metadata(dataset, metadata)
    vocab, k, mode, pad = meta["vocab_size"], meta["k"], meta["mode"], meta["pad_token_id"]
    if expected_vocab_size is not None and vocab != expected_vocab_size:
        raise ReplayBufferError(
            f"the dataset's replay buffer was made for a vocabulary of {vocab} tokens, but expected_vocab_size is "
            f"{expected_vocab_size}: its teacher ids index another vocabulary")
    if meta.get("complete") is False:
        raise ReplayBufferError("the dataset holds an incomplete replay buffer (metadata complete=false)")
    lp_dtype = LOGPROB_DTYPES[meta["logprob_dtype"]]
    sampled = bool(meta.get(SAMPLED_FIELD, False))
    names = ["input_ids", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"] + ([SAMPLED_FIELD] if sampled else [])
    missing = [name for name in names if name not in dataset.column_names]
    if missing:
        raise ReplayBufferError(f"dataset lacks columns {missing}")
    parts = []
    for table in dataset.with_format("arrow").iter(batch_size=_ROWS_PER_BATCH):
        tokens, lengths = _column(table, "input_ids", 1, torch.int32)
        if lengths.numel() and int(lengths.min()) < 1:
            raise ReplayBufferError("dataset: every sequence needs at least one token")
        width = max(int(lengths.max()), 1) if lengths.numel() else 1
        padded = {"input_ids": scatter_ragged(tokens.long(), lengths, width, pad), "lengths": lengths}
        for name, depth, dtype, fill in (("teacher_ids", 2, torch.int32, -1), ("teacher_logprobs", 2, lp_dtype, 0.0),
                                         ("teacher_tail_logprob", 1, lp_dtype, float("-inf")),
                                         (SAMPLED_FIELD, 1, torch.float32, 0.0)):
            if name not in names:
                continue
            flat, column_lengths = _column(table, name, depth, dtype, k)
            if not torch.equal(column_lengths, lengths):
                raise ReplayBufferError(f"dataset: column {name!r} must have one entry per token of input_ids")
            padded[name] = scatter_ragged(flat, lengths, width, fill)
        parts.append(cls.from_tensors(padded, vocab_size=vocab, mode=mode, pad_token_id=pad))
    meta_only = {key: value for key, value in meta.items() if key not in (_DIGEST, "bytes_per_token")}
    if parts:
        buffer = cls.concat(parts, metadata=meta_only)
    else:
        buffer = cls(torch.zeros(0, 1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                     torch.zeros(0, 1, k, dtype=torch.int32), torch.zeros(0, 1, k, dtype=lp_dtype),
                     torch.zeros(0, 1, dtype=lp_dtype), vocab_size=vocab, mode=mode, pad_token_id=pad,
                     metadata=meta_only, sampled_logprobs=torch.zeros(0, 1) if sampled else None)
    if buffer.k != k:
        raise ReplayBufferError(f"dataset: teacher rows of k = {buffer.k}, but its metadata says k = {k}")
    if verify_checksum and _DIGEST in meta and _content_digest(buffer) != meta[_DIGEST]:
        raise ReplayBufferError("dataset: its rows are not those its metadata's content_sha256 records (changed or "
                                "damaged); pass verify_checksum=False if they were changed on purpose")
    if validate:
        buffer.validate()
    return buffer
