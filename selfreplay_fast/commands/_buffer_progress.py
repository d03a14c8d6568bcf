"""How far the buffer in an output directory has got: the lines ``generate`` and ``cache`` print
when they resume, when they are interrupted, and in their closing summary.

Everything is read from the directory's ``metadata.json``, which the writers rewrite (atomically)
after each complete shard, so what it lists is what a rerun builds on.
"""

from __future__ import annotations

from typing import List, Optional

from ..replay_buffer import ReplayBufferError, read_metadata


def read_buffer_metadata(out_dir: str) -> Optional[dict]:
    """The metadata in ``out_dir``, or None where there is none or it cannot be read (the writer,
    which reads it again, is the one that reports a damaged or foreign directory)."""
    try:
        metadata = read_metadata(out_dir)
    except (ReplayBufferError, OSError, ValueError):
        return None
    return metadata if isinstance(metadata, dict) else None


def matching_buffer(out_dir: str, settings_key: str, expected: dict) -> Optional[dict]:
    """The metadata in ``out_dir`` if its producer's settings (under ``settings_key``) agree with
    ``expected`` (the settings the command line determines), else None."""
    metadata = read_buffer_metadata(out_dir)
    settings = metadata.get(settings_key) if metadata is not None else None
    if not isinstance(settings, dict) or any(settings.get(key) != value for key, value in expected.items()):
        return None
    return metadata


def _count(metadata: Optional[dict], key: str) -> int:
    value = (metadata or {}).get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def done_and_total(metadata: dict, settings_key: str):
    """(sequences saved, sequences the run is for) of a buffer directory's metadata."""
    return _count(metadata, "num_sequences"), _count(metadata.get(settings_key), "num_sequences")


def resume_line(out_dir: str, settings_key: str, expected: dict) -> Optional[str]:
    """``resuming: N of M sequences done`` when ``out_dir`` holds this command's unfinished or
    finished buffer, else None."""
    metadata = matching_buffer(out_dir, settings_key, expected)
    if metadata is None:
        return None
    done, total = done_and_total(metadata, settings_key)
    return f"resuming: {done} of {total} sequences done in {out_dir}"


def interrupted_note(out_dir: str, settings_key: str, expected: dict) -> str:
    """What survives a Ctrl-C: the shards ``metadata.json`` lists, and how to go on."""
    metadata = matching_buffer(out_dir, settings_key, expected)
    done, total = done_and_total(metadata, settings_key) if metadata is not None else (0, 0)
    if done == 0:
        return f"no sequence was saved in {out_dir} yet"
    return f"{done} of {total} sequences are safely saved in {out_dir}; rerun the same command to resume"


def shard_entries(metadata: Optional[dict]) -> List[dict]:
    shards = (metadata or {}).get("shards")
    return [entry for entry in shards if isinstance(entry, dict)] if isinstance(shards, list) else []


def new_shard_entries(before: Optional[dict], after: dict) -> List[dict]:
    """The shards a run added: those ``after`` lists beyond the ones ``before`` (read when the run
    started) listed. A resumed run only appends, so the listed shards before are a prefix."""
    return shard_entries(after)[len(shard_entries(before)):]


def sum_entries(entries: List[dict], key: str) -> int:
    return sum(_count(entry, key) for entry in entries)


def buffer_totals(metadata: dict) -> dict:
    """The whole buffer's counts, as its metadata states them."""
    return {
        "sequences": _count(metadata, "num_sequences"),
        "tokens": _count(metadata, "num_tokens"),
        "shards": len(shard_entries(metadata)),
        "complete": metadata.get("complete") is True,
        "k": metadata.get("k"),
        "vocab_size": metadata.get("vocab_size"),
    }
