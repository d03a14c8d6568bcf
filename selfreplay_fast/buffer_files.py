"""The on-disk format of a replay buffer: a directory of safetensors shards plus ``metadata.json``.

* Every file is written to a temporary name (``.<name>.<pid>.<16 hex>.tmp``), fsynced and renamed into
  place, so a crash never leaves a half-written file under a real name. A writer holding the directory's
  lock (``dir_lock.py``) removes the temporaries that crashed writers left (:func:`remove_stale_temporaries`).
* Shards are named by the writer's own pattern, ``shard-NNNNN.safetensors`` (generation 0) or
  ``shard-NNNNN-gG.safetensors`` (generation G >= 1). ``ReplayBuffer.save(overwrite=True)`` alternates
  between generations 0 and 1, writing the new shards beside the ones it replaces, so that the old buffer
  stays whole until the new metadata is in place.
  A shard name read from metadata must be exactly such a name, for the entry's own index: a plain file
  in the buffer directory. Anything else (``../x``, absolute paths, subdirectories, other names) is
  refused, and shards are opened without following symbolic links, so no metadata makes the library read,
  checksum or delete a file outside the buffer.
* ``metadata.json`` is checked against a schema (:func:`check_metadata`: every field's type and range,
  shard entries in index order, counts that add up) and carries ``metadata_sha256``, the sha256 of its
  own canonical content, so an edited file is detected (metadata written before this field existed
  still loads). This catches damage and careless edits; it is not a signature against someone who
  recomputes the digest.
* Each shard's safetensors header records the buffer's ``mode`` and ``vocab_size`` (and, from format v2,
  the format version); a metadata file that disagrees with its shards is refused.
* The tensors of a shard are laid out as ``buffer_layout.py`` describes: ragged with narrow ids in format
  v2 (what is written), padded in format v1 (still read, and written on request). :func:`read_shard` returns
  the padded in-memory tensors for both.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import stat
from typing import Dict, Optional

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from .buffer_layout import pack_v1, pack_v2, token_dtype, unpack_v2, v2_tensor_names

FORMAT_NAME = "selfreplay-fast/replay-buffer"
FORMAT_VERSION = 2  # what is written; READABLE_VERSIONS load
READABLE_VERSIONS = (1, 2)
METADATA_FILE = "metadata.json"
MODES = ("tail", "sampled")
LOGPROB_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Teacher mass may differ from 1 by this much (rounding of cached log-probs) before validate() calls it an
# error; the same tolerance fused_replay_kl applies.
MASS_TOLERANCE = 1e-3
TENSOR_NAMES = ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob")  # format v1
SAMPLED_FIELD = "sampled_logprobs"  # metadata: true when the shards hold the sampled tokens' log-probs (v2)
DIGEST_FIELD = "metadata_sha256"

_SHARD_NAME = re.compile(r"shard-(\d{5,})(?:-g(\d+))?\.safetensors")
_TEMP_NAME = re.compile(r"\.(.+)\.\d+\.[0-9a-f]{16}\.tmp")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_MISSING = object()  # a field absent from metadata (None is a value: JSON null)


class ReplayBufferError(ValueError):
    """A buffer on disk is corrupt, incomplete or incompatible with what the caller expects."""


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    # A rename or unlink is only durable once the directory entry is flushed (POSIX); not possible on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either the old content or all of ``data``."""
    directory = os.path.dirname(os.path.abspath(path))
    # A unique hidden name in the same directory (so that the rename is atomic), created with the mode
    # open() gives, i.e. under the umask: mkstemp's 0600 would make the buffer unreadable to other users.
    tmp_path = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise
    fsync_dir(directory)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_stale_temporaries(directory: str) -> list:
    """Remove the temporaries of :func:`atomic_write_bytes` that crashed writers left in a buffer directory
    (only names of our own pattern, for our own files). Call it only while holding the directory's lock:
    then no write is in progress, so every such temporary is stale. Returns the names removed."""
    removed = []
    for name in os.listdir(directory):
        match = _TEMP_NAME.fullmatch(name)
        if match is None or not (match.group(1) == METADATA_FILE or parse_shard_file_name(match.group(1))):
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    if removed:
        fsync_dir(directory)
    return removed


# --------------------------------------------------------------------------------------------------
# Shard names and files
# --------------------------------------------------------------------------------------------------


def shard_file_name(index: int, generation: int = 0) -> str:
    """The file name of shard ``index``; ``generation`` >= 1 for the shards of an overwriting save."""
    return f"shard-{index:05d}.safetensors" if generation == 0 else f"shard-{index:05d}-g{generation}.safetensors"


def parse_shard_file_name(name) -> Optional[tuple]:
    """``(index, generation)`` if ``name`` is exactly a name :func:`shard_file_name` makes, else None."""
    if not isinstance(name, str):
        return None
    match = _SHARD_NAME.fullmatch(name)
    if match is None:
        return None
    index, generation = int(match.group(1)), int(match.group(2) or 0)
    return (index, generation) if shard_file_name(index, generation) == name else None


def shard_generation(metadata: dict) -> Optional[int]:
    """The generation of the shards a (checked) metadata lists; None when it lists none."""
    shards = metadata.get("shards") or []
    return parse_shard_file_name(shards[0]["file"])[1] if shards else None


def _lstat_regular(path: str, what: str) -> os.stat_result:
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise ReplayBufferError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ReplayBufferError(f"{what} {path} is not a plain file (a link or another kind of file); refused")
    return info


def shard_stat(directory: str, entry: dict) -> tuple:
    """What identifies a shard file's content without reading it: device, inode, size, mtime and ctime
    (no user can set a ctime back, so a rewrite that restores the mtime is still seen)."""
    info = _lstat_regular(os.path.join(directory, entry["file"]), "shard")
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def shard_path(directory: str, entry: dict) -> str:
    """The path of a checked entry's shard, refused unless it is a plain file (no link) in ``directory``."""
    path = os.path.join(directory, entry["file"])
    _lstat_regular(path, "shard")
    return path


def _open_shard(path: str):
    """A shard opened for reading, never through a symbolic link (O_NOFOLLOW) and only if a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | _NO_FOLLOW | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ReplayBufferError(f"shard {path} is a symbolic link; refused") from None
        raise ReplayBufferError(f"cannot read shard {path}: {exc.strerror or exc}") from exc
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise ReplayBufferError(f"shard {path} is not a plain file; refused")
    return handle


def _read_shard_bytes(path: str) -> bytes:
    with _open_shard(path) as handle:
        try:
            return handle.read()
        except OSError as exc:
            raise ReplayBufferError(f"cannot read shard {path}: {exc.strerror or exc}") from exc


def sha256_shard(directory: str, entry: dict, chunk_bytes: int = 1 << 22) -> str:
    """The sha256 of a shard file, streamed (never the whole shard in memory)."""
    path = shard_path(directory, entry)
    digest = hashlib.sha256()
    with _open_shard(path) as handle:
        try:
            for chunk in iter(lambda: handle.read(chunk_bytes), b""):
                digest.update(chunk)
        except OSError as exc:
            raise ReplayBufferError(f"cannot read shard {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def check_shard_digest(directory: str, entry: dict, digest: str) -> None:
    if digest != entry["sha256"]:
        # The file's own digest is not printed: it says nothing useful and is information about a file.
        raise ReplayBufferError(
            f"checksum mismatch for {os.path.join(directory, entry['file'])}: its content is not what "
            f"{METADATA_FILE} records (the shard is corrupt or was modified; regenerate it)"
        )


_HEADER_KEY = "selfreplay_fast"


def shard_header(buffer_metadata: dict) -> Dict[str, str]:
    """What a shard's safetensors header records about its buffer (checked against metadata on read)."""
    # One key holding sorted JSON: safetensors writes a header map in no fixed order, and shards must be
    # byte-identical from run to run (a resumed generation equals an uninterrupted one byte for byte).
    fields = {"mode": buffer_metadata["mode"], "vocab_size": buffer_metadata["vocab_size"]}
    if buffer_metadata.get("format_version", FORMAT_VERSION) >= 2:
        fields["format_version"] = buffer_metadata.get("format_version", FORMAT_VERSION)
    return {_HEADER_KEY: json.dumps(fields, sort_keys=True)}


def check_shard_header(path: str, header: Optional[dict], metadata: dict) -> None:
    """Refuse a shard whose header contradicts the buffer's metadata (shards written before headers existed
    have none and pass)."""
    try:
        fields = json.loads((header or {}).get(_HEADER_KEY, "{}"))
    except (TypeError, ValueError):
        raise ReplayBufferError(f"shard {path} has a damaged header") from None
    if not isinstance(fields, dict):
        raise ReplayBufferError(f"shard {path} has a damaged header")
    for field in ("mode", "vocab_size", "format_version"):
        if field in fields and fields[field] != metadata.get(field):
            raise ReplayBufferError(
                f"shard {path} was written with {field}={fields[field]}, but {METADATA_FILE} says "
                f"{field}={metadata.get(field)!r} (the metadata was changed; regenerate the buffer)"
            )


def _header_of_bytes(data: bytes) -> Optional[dict]:
    try:
        size = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + size]).get("__metadata__")
    except (ValueError, AttributeError):
        return None


def write_shard(directory: str, index: int, tensors: Dict[str, torch.Tensor], *, generation: int = 0,
                header: Optional[Dict[str, str]] = None, metadata: Optional[dict] = None) -> dict:
    """Serialize one shard atomically; returns its metadata entry (file name, counts, sha256).

    ``tensors`` are the padded in-memory tensors of the shard's sequences; they are written in the layout of
    ``metadata["format_version"]`` (``metadata`` None: as given, the v1 layout). ``header`` defaults to
    :func:`shard_header` of ``metadata``."""
    tensors = {name: t.cpu() for name, t in tensors.items() if t is not None}
    if metadata is not None:
        if header is None:
            header = shard_header(metadata)
        if metadata.get("format_version") == 1:
            tensors = pack_v1(tensors)
        else:
            if not metadata.get(SAMPLED_FIELD):
                tensors.pop(SAMPLED_FIELD, None)
            elif SAMPLED_FIELD not in tensors:
                raise ValueError(f"{SAMPLED_FIELD}: {METADATA_FILE} says the shards hold it, but this shard has none")
            tensors = pack_v2(tensors, metadata["vocab_size"])
    data = safetensors_save({name: t.contiguous() for name, t in tensors.items()}, metadata=header)
    name = shard_file_name(index, generation)
    atomic_write_bytes(os.path.join(directory, name), data)
    lengths = tensors["lengths"]
    return {
        "file": name,
        "num_sequences": int(lengths.numel()),
        "num_tokens": int(lengths.sum()),
        "seq_len": int(tensors["input_ids"].shape[1]) if "input_ids" in tensors else int(lengths.max()),
        "sha256": sha256_bytes(data),
    }


def read_shard(directory: str, entry: dict, metadata: Optional[dict] = None, *,
               verify: bool = True) -> Dict[str, torch.Tensor]:
    """All tensors of an entry's shard, its sha256 verified (with ``verify``) and, given the buffer's
    checked ``metadata``, its header and tensor shapes checked against it."""
    if parse_shard_file_name(entry.get("file")) is None:
        raise ReplayBufferError(f"{directory}: a shard entry names a file that is not one of this buffer's shards")
    path = os.path.join(directory, entry["file"])
    data = _read_shard_bytes(path)
    if verify:
        check_shard_digest(directory, entry, sha256_bytes(data))
    try:
        tensors = safetensors_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ReplayBufferError(f"shard {path} is not a valid safetensors file: {exc}") from exc
    if metadata is None:
        if "tokens" in tensors:
            raise ReplayBufferError(f"shard {path} is of format v2: reading it needs its buffer's metadata")
        names = TENSOR_NAMES
    else:
        names = shard_tensor_names(metadata)
        check_shard_header(path, _header_of_bytes(data), metadata)  # first: a header names another format
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ReplayBufferError(f"shard {path} lacks tensors {missing}")
    if metadata is not None:
        check_shard_shapes(path, {name: list(t.shape) for name, t in tensors.items()}, entry, metadata,
                           dtypes={name: t.dtype for name, t in tensors.items()})
        if metadata["format_version"] >= 2:
            check_ragged_lengths(path, tensors["lengths"], entry)
            return unpack_v2(tensors, metadata["vocab_size"], metadata["k"], metadata["pad_token_id"])
    return tensors


def shard_tensor_names(metadata: dict) -> tuple:
    """The tensors every shard of a buffer with (checked) ``metadata`` holds."""
    if metadata["format_version"] == 1:
        return TENSOR_NAMES
    return v2_tensor_names(metadata["vocab_size"], bool(metadata.get(SAMPLED_FIELD, False)))


def check_ragged_lengths(path: str, lengths: torch.Tensor, entry: dict) -> None:
    """A v2 shard's lengths must be positive, sum to its token count and reach its entry's width."""
    lengths = lengths.to(torch.int64)
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.sum()) != entry["num_tokens"]
                            or int(lengths.max()) != entry["seq_len"]):
        raise ReplayBufferError(
            f"shard {path}: its lengths do not add up to the {entry['num_tokens']} tokens of width "
            f"{entry['seq_len']} that {METADATA_FILE} records (the metadata or the shard was changed)")


def check_shard_shapes(path: str, shapes: dict, entry: dict, metadata: dict, *, dtypes: dict) -> None:
    """Refuse a shard whose tensor shapes, k or dtypes contradict its entry or the metadata (``shapes`` and
    ``dtypes`` by tensor name, in the layout of the metadata's format version)."""
    if metadata["format_version"] >= 2:
        _check_ragged_shapes(path, shapes, entry, metadata, dtypes)
        return
    k = metadata["k"]
    if len(shapes["input_ids"]) != 2:
        raise ReplayBufferError(f"shard {path}: input_ids of shape {shapes['input_ids']}, expected [S, L]")
    num, width = shapes["input_ids"]
    if shapes["lengths"] != [num] or shapes["teacher_tail_logprob"] != [num, width]:
        raise ReplayBufferError(f"shard {path}: tensor shapes {shapes} do not fit [S], [S, L]")
    if shapes["teacher_ids"] != [num, width, k] or shapes["teacher_logprobs"] != [num, width, k]:
        raise ReplayBufferError(
            f"shard {path}: teacher tensors of shape {shapes['teacher_ids']}, but {METADATA_FILE} says "
            f"k={k} for [S={num}, L={width}, k] (the metadata or the shard was changed)"
        )
    if (num, width) != (entry["num_sequences"], entry["seq_len"]):
        raise ReplayBufferError(
            f"shard {entry['file']} holds {num} sequences of width {width}, {METADATA_FILE} says "
            f"{entry['num_sequences']} of width {entry['seq_len']}")
    _check_logprob_dtype(path, dtypes["teacher_logprobs"], metadata)


def _check_logprob_dtype(path, dtype, metadata) -> None:
    if dtype != LOGPROB_DTYPES[metadata["logprob_dtype"]]:
        raise ReplayBufferError(
            f"shard {path} stores log-probs as {dtype}, but {METADATA_FILE} says logprob_dtype="
            f"{metadata['logprob_dtype']!r} (the metadata or the shard was changed)"
        )


def _check_ragged_shapes(path, shapes, entry, metadata, dtypes) -> None:
    k, vocab = metadata["k"], metadata["vocab_size"]
    num, tokens = entry["num_sequences"], entry["num_tokens"]
    lp_dtype = LOGPROB_DTYPES[metadata["logprob_dtype"]]
    expected = {"lengths": ([num], torch.int64), "tokens": ([tokens], token_dtype(vocab)),
                "teacher_ids": ([tokens, k], torch.uint16), "teacher_logprobs": ([tokens, k], lp_dtype),
                "teacher_tail_logprob": ([tokens], lp_dtype), "teacher_ids_high": (None, torch.uint8),
                SAMPLED_FIELD: ([tokens], torch.float32)}
    names = shard_tensor_names(metadata)
    extra = sorted(set(shapes) - set(names))
    if extra:
        raise ReplayBufferError(f"shard {path} holds tensors {extra} that {METADATA_FILE} does not describe "
                                "(the metadata or the shard was changed)")
    for name in names:
        shape, dtype = expected[name]
        if name == "teacher_ids_high":
            shape = [tokens, (int(vocab).bit_length() - 16) * (-(-k // 8))]
        if shapes[name] != shape:
            raise ReplayBufferError(
                f"shard {path}: {name} of shape {shapes[name]}, but {METADATA_FILE} says {shape} (S={num} "
                f"sequences, T={tokens} tokens, k={k}; the metadata or the shard was changed)")
        if dtypes[name] != dtype:
            if name in ("teacher_logprobs", "teacher_tail_logprob"):
                _check_logprob_dtype(path, dtypes[name], metadata)
            raise ReplayBufferError(f"shard {path}: {name} stored as {dtypes[name]}, expected {dtype} for this "
                                    f"buffer (the metadata or the shard was changed)")


# --------------------------------------------------------------------------------------------------
# metadata.json: schema, integrity, reading and writing
# --------------------------------------------------------------------------------------------------


def _canonical_digest(metadata: dict) -> str:
    content = {key: value for key, value in metadata.items() if key != DIGEST_FIELD}
    return sha256_bytes(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def write_metadata(directory: str, metadata: dict) -> None:
    """Write ``metadata.json`` atomically, with the digest of its own content."""
    content = {key: value for key, value in metadata.items() if key != DIGEST_FIELD}
    content[DIGEST_FIELD] = _canonical_digest(content)
    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(os.path.join(directory, METADATA_FILE), text.encode())


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_metadata(metadata: dict, where: str) -> None:
    """Refuse metadata that does not follow the schema, naming the field: each field's type and range,
    shard entries named by the writer's pattern in index order 0..n-1 (one generation), full shards of
    ``shard_size`` sequences but the last, counts that add up. ``where`` names the file in messages."""

    def fail(field, expected, value):
        shown = "missing" if value is _MISSING else f"got {json.dumps(value)[:80]}"
        raise ReplayBufferError(f"{where}: field {field!r} must be {expected}, {shown}")

    for field, low in (("vocab_size", 1), ("k", 1), ("shard_size", 1), ("num_sequences", 0), ("num_tokens", 0)):
        if not _is_int(metadata.get(field, _MISSING), low):
            fail(field, f"an int >= {low}", metadata.get(field, _MISSING))
    if metadata.get("mode", _MISSING) not in MODES:
        fail("mode", f"one of {list(MODES)}", metadata.get("mode", _MISSING))
    if metadata.get("logprob_dtype", _MISSING) not in LOGPROB_DTYPES:
        fail("logprob_dtype", f"one of {list(LOGPROB_DTYPES)}", metadata.get("logprob_dtype", _MISSING))
    if not _is_int(metadata.get("pad_token_id", _MISSING), -(2**63)):
        fail("pad_token_id", "an int", metadata.get("pad_token_id", _MISSING))
    if not isinstance(metadata.get("complete", _MISSING), bool):
        fail("complete", "true or false", metadata.get("complete", _MISSING))
    if not isinstance(metadata.get(SAMPLED_FIELD, False), bool) or (
            metadata.get(SAMPLED_FIELD) and metadata.get("format_version") == 1):
        fail(SAMPLED_FIELD, "true or false (true only from format v2)", metadata.get(SAMPLED_FIELD))
    shards = metadata.get("shards", _MISSING)
    if not isinstance(shards, list):
        fail("shards", "a list of shard entries", shards)
    generation = None
    for index, entry in enumerate(shards):
        field = f"shards[{index}]"
        if not isinstance(entry, dict):
            fail(field, "an object", entry)
        parsed = parse_shard_file_name(entry.get("file"))
        if parsed is None:
            # The name itself is not echoed: it may point anywhere.
            raise ReplayBufferError(
                f"{where}: field '{field}.file' must be a shard file name of this buffer "
                f"(shard-NNNNN.safetensors or shard-NNNNN-gG.safetensors in its directory), got another name")
        if parsed[0] != index:
            raise ReplayBufferError(
                f"{where}: field '{field}.file' names shard {parsed[0]}, expected shard {index} (shard entries "
                "must list shards 0..n-1 in order, each once: an entry is duplicated, dropped or moved)")
        if generation is not None and parsed[1] != generation:
            raise ReplayBufferError(f"{where}: field '{field}.file' is of another save than shards[0]")
        generation = parsed[1]
        for key, low in (("num_sequences", 1), ("num_tokens", 1), ("seq_len", 1)):
            if not _is_int(entry.get(key, _MISSING), low):
                fail(f"{field}.{key}", f"an int >= {low}", entry.get(key, _MISSING))
        if not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            fail(f"{field}.sha256", "a sha256 (64 lowercase hex digits)", entry.get("sha256", _MISSING))
        if entry["num_tokens"] < entry["num_sequences"] or entry["num_tokens"] > entry["num_sequences"] * entry["seq_len"]:
            fail(f"{field}.num_tokens", "between num_sequences and num_sequences * seq_len", entry["num_tokens"])
        if entry["num_sequences"] > metadata["shard_size"] or (
                index < len(shards) - 1 and entry["num_sequences"] != metadata["shard_size"]):
            fail(f"{field}.num_sequences", f"shard_size={metadata['shard_size']} (at most, for the last shard)",
                 entry["num_sequences"])
    for total in ("num_sequences", "num_tokens"):
        listed = sum(entry[total] for entry in shards)
        if metadata[total] != listed:
            raise ReplayBufferError(
                f"{where}: field {total!r} says {metadata[total]} but its shards hold {listed} "
                "(an entry is missing, duplicated or changed)")


def read_metadata(directory: str) -> Optional[dict]:
    """The checked metadata of the buffer in ``directory`` (without its digest field), or None if there is
    none. Raises ReplayBufferError on a foreign, damaged or edited file."""
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.lexists(path):
        return None
    _lstat_regular(path, "metadata file")  # never a link to some other file
    try:
        with open(os.open(path, os.O_RDONLY | _NO_FOLLOW), "r", encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as exc:
        # json's message gives a position only, never content.
        raise ReplayBufferError(f"{path} is not a readable replay-buffer metadata file: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ReplayBufferError(f"{path} is not a replay-buffer metadata file (a JSON {type(metadata).__name__})")
    if metadata.get("format") != FORMAT_NAME:
        shown = metadata.get("format") if isinstance(metadata.get("format"), str) else type(metadata.get("format")).__name__
        raise ReplayBufferError(f"{path} does not describe a selfreplay-fast replay buffer (format {shown[:60]!r})")
    version = metadata.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise ReplayBufferError(
            f"{path} has replay-buffer format version {str(version)[:20]}; this selfreplay-fast reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if DIGEST_FIELD in metadata and metadata[DIGEST_FIELD] != _canonical_digest(metadata):
        raise ReplayBufferError(
            f"{path} was changed after it was written (its content does not match its {DIGEST_FIELD}); "
            "regenerate the buffer, or restore the file"
        )
    check_metadata(metadata, path)
    metadata.pop(DIGEST_FIELD, None)
    return metadata


def open_buffer_metadata(directory, expected_vocab_size: Optional[int], allow_incomplete: bool) -> "tuple[str, dict]":
    """The checks ``ReplayBuffer.load`` and ``ReplayBuffer.open`` share: a buffer directory with checked
    metadata, the expected vocabulary, complete unless ``allow_incomplete``."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    directory = os.fspath(directory)
    if expected_vocab_size is not None and (
            isinstance(expected_vocab_size, bool) or not isinstance(expected_vocab_size, int) or expected_vocab_size < 1):
        raise ValueError(f"expected_vocab_size must be a positive int or None, got {expected_vocab_size!r}")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no replay buffer at {directory}: not a directory")
    meta = read_metadata(directory)
    if meta is None:
        raise FileNotFoundError(f"no replay buffer at {directory}: {METADATA_FILE} is missing")
    vocab = meta["vocab_size"]
    if expected_vocab_size is not None and vocab != expected_vocab_size:
        raise ReplayBufferError(
            f"the replay buffer at {directory} was made for a vocabulary of {vocab} tokens "
            f"(model {str(meta.get('model_name'))[:200]!r}), but expected_vocab_size is {expected_vocab_size}: "
            "its teacher ids index another vocabulary; regenerate the buffer with this model"
        )
    if not meta["complete"] and not allow_incomplete:
        raise ReplayBufferError(
            f"the replay buffer at {directory} is incomplete ({len(meta['shards'])} shard(s) written): "
            "rerun the generation into the same directory to finish it, or pass allow_incomplete=True"
        )
    return directory, meta
