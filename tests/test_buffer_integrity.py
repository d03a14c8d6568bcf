"""Hostile and damaged buffer directories (issue #10, items 2, 3, 9 and 10): shard names that point
outside the buffer, metadata that breaks the schema or was edited, an overwrite interrupted before its
metadata switch, teacher mass short of 1, crash temporaries, a shard rewritten after opening."""

import hashlib
import json
import math
import os
import time

import pytest

from selfreplay_fast import replay_buffer as rb
from selfreplay_fast.replay_buffer import ReplayBuffer, ReplayBufferError
from test_replay_buffer import VOCAB, assert_same, make_buffer

LOADERS = {"load": ReplayBuffer.load, "open": ReplayBuffer.open}


FORMAT_VERSIONS = pytest.mark.parametrize("format_version", [1, 2])  # v1 is still read (and written on request)


def saved(tmp_path, name="buf", num_seq=9, shard_size=4, seed=0, format_version=rb.FORMAT_VERSION, **kw):
    path = str(tmp_path / name)
    make_buffer(num_seq=num_seq, seed=seed, **kw).save(path, shard_size=shard_size, format_version=format_version)
    return path


def raw_metadata(path):
    with open(os.path.join(path, "metadata.json")) as handle:
        return json.load(handle)


def write_raw_metadata(path, meta):
    """Edit metadata.json as a user with a text editor would: its digest is left as it was."""
    with open(os.path.join(path, "metadata.json"), "w") as handle:
        json.dump(meta, handle)


def rewrite_metadata(path, edit):
    """Edit metadata.json through the library's writer, so that its own digest is valid: only the schema
    and the cross-checks against the shards can catch the edit."""
    meta = raw_metadata(path)
    meta.pop("metadata_sha256", None)
    edit(meta)
    rb.write_metadata(path, meta)


@pytest.fixture
def outside(tmp_path):
    """A file outside every buffer directory, which no buffer operation may read, reveal or delete."""
    target = tmp_path / "precious.txt"
    target.write_bytes(b"the user's own data, not a shard\n")
    return target


# --------------------------------------------------------------------------------------------------
# Item 2: shard names are plain file names of the writer's pattern, inside the buffer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../precious.txt", "ABSOLUTE", "sub/shard-00000.safetensors",
                                  "other.safetensors", "shard-0.safetensors", "shard-00000.safetensors/..",
                                  "shard-00000-g0.safetensors", "shard-00001.safetensors"])
@pytest.mark.parametrize("how", sorted(LOADERS))
def test_a_shard_name_outside_the_pattern_is_refused_naming_the_field(tmp_path, outside, name, how):
    path = saved(tmp_path)
    name = str(outside) if name == "ABSOLUTE" else name
    os.makedirs(os.path.join(path, "sub"), exist_ok=True)
    rewrite_metadata(path, lambda meta: meta["shards"][0].update(file=name))
    with pytest.raises(ReplayBufferError, match=r"shards\[0\]\.file") as info:
        LOADERS[how](path)
    assert "precious" not in str(info.value)
    assert hashlib.sha256(outside.read_bytes()).hexdigest() not in str(info.value)


def test_overwrite_never_deletes_a_file_the_old_metadata_names_outside_the_buffer(tmp_path, outside):
    path = saved(tmp_path)
    rewrite_metadata(path, lambda meta: meta["shards"][1].update(file="../precious.txt"))
    with pytest.raises(ReplayBufferError, match=r"shards\[1\]\.file"):
        make_buffer(seed=5).save(path, overwrite=True)
    rewrite_metadata(path, lambda meta: meta["shards"][1].update(file=str(outside)))
    with pytest.raises(ReplayBufferError, match=r"shards\[1\]\.file"):
        make_buffer(seed=5).save(path, overwrite=True)
    assert outside.read_bytes() == b"the user's own data, not a shard\n"


def test_a_resumed_writer_refuses_a_shard_name_outside_the_pattern(tmp_path, outside):
    from test_teacher_cache import corpus, tiny_model

    model, seqs, out = tiny_model(), corpus(count=5), tmp_path / "cache"
    import selfreplay_fast as sf

    sf.build_teacher_cache(model, seqs, 3, out, shard_size=2, progress=False)
    rewrite_metadata(str(out), lambda meta: meta["shards"][0].update(file="../precious.txt"))
    with pytest.raises(ReplayBufferError, match=r"shards\[0\]\.file") as info:
        sf.build_teacher_cache(model, seqs, 3, out, shard_size=2, progress=False)
    assert hashlib.sha256(outside.read_bytes()).hexdigest() not in str(info.value)


def test_overwrite_removes_only_its_own_files(tmp_path):
    path = saved(tmp_path)
    for name in ("notes.txt", "shard-1.safetensors", "model-00001-of-00002.safetensors", ".hidden"):
        with open(os.path.join(path, name), "w") as handle:
            handle.write("keep me")
    make_buffer(seed=5, num_seq=3).save(path, overwrite=True, shard_size=2)
    assert sorted(os.listdir(path)) == [".hidden", "metadata.json", "model-00001-of-00002.safetensors",
                                        "notes.txt", "shard-00000-g1.safetensors", "shard-00001-g1.safetensors",
                                        "shard-1.safetensors"]
    assert_same(ReplayBuffer.load(path), make_buffer(seed=5, num_seq=3))


@pytest.mark.parametrize("how", sorted(LOADERS))
def test_a_shard_that_is_a_link_to_a_foreign_file_is_refused_without_revealing_it(tmp_path, outside, how):
    path = saved(tmp_path)
    shard = os.path.join(path, "shard-00001.safetensors")
    os.unlink(shard)
    os.symlink(outside, shard)
    with pytest.raises(ReplayBufferError, match="shard-00001") as info:
        LOADERS[how](path)
    assert hashlib.sha256(outside.read_bytes()).hexdigest() not in str(info.value)
    assert "user's own data" not in str(info.value)


@FORMAT_VERSIONS
def test_a_checksum_error_does_not_print_the_files_digest(tmp_path, format_version):
    path = saved(tmp_path, format_version=format_version)
    shard = os.path.join(path, "shard-00000.safetensors")
    data = bytearray(open(shard, "rb").read())
    data[-2] ^= 0x10
    open(shard, "wb").write(bytes(data))
    for load in LOADERS.values():
        with pytest.raises(ReplayBufferError, match="checksum mismatch for .*shard-00000") as info:
            load(path)
        assert hashlib.sha256(bytes(data)).hexdigest() not in str(info.value)


# --------------------------------------------------------------------------------------------------
# Item 3: an overwrite interrupted before its metadata switch leaves the old buffer loadable
# --------------------------------------------------------------------------------------------------


def test_overwrite_killed_before_the_metadata_switch_keeps_the_old_buffer(tmp_path, monkeypatch):
    path = saved(tmp_path, seed=0)

    def crash(directory, metadata):
        raise KeyboardInterrupt("killed between the shard writes and the metadata write")

    monkeypatch.setattr(rb, "write_metadata", crash)
    with pytest.raises(KeyboardInterrupt):
        make_buffer(seed=1, num_seq=12).save(path, shard_size=4, overwrite=True)
    monkeypatch.undo()
    for load in LOADERS.values():
        load(path)
    assert_same(ReplayBuffer.load(path), make_buffer(seed=0, num_seq=9))
    make_buffer(seed=1, num_seq=12).save(path, shard_size=4, overwrite=True)  # the retry cleans up after it
    assert_same(ReplayBuffer.load(path), make_buffer(seed=1, num_seq=12))
    assert sorted(os.listdir(path)) == ["metadata.json"] + [f"shard-0000{i}-g1.safetensors" for i in range(3)]


# --------------------------------------------------------------------------------------------------
# Item 9 (the buffer's half): slots + tail within MASS_TOLERANCE of 1, both ways
# --------------------------------------------------------------------------------------------------


def tail_short_of_one(buffer, row=(0, 0), slot_mass=0.5, tail=0.1):
    buffer.teacher_logprobs[row][0] = math.log(slot_mass)
    buffer.teacher_logprobs[row][1:] = -30.0
    buffer.teacher_tail_logprob[row] = math.log(tail)
    return buffer


def test_validate_refuses_teacher_mass_short_of_one_naming_both_arguments(tmp_path):
    with pytest.raises(ValueError, match="teacher_logprobs and teacher_tail_logprob.*mass 1"):
        tail_short_of_one(make_buffer()).validate()
    # the total mass just inside the tolerance passes, just outside (either way) does not
    for total, ok in ((1 - 0.0008, True), (1 + 0.0008, True), (1 - 0.002, False), (1 + 0.002, False)):
        b = make_buffer()
        slots = b.teacher_logprobs[0, 0].double().exp().sum()
        assert slots < 0.995  # room for a tail of 0.002 below the total
        b.teacher_tail_logprob[0, 0] = math.log(total - float(slots))
        if ok:
            b.validate()
        else:
            with pytest.raises(ValueError, match="teacher_logprobs and teacher_tail_logprob"):
                b.validate()
    bad = tail_short_of_one(make_buffer(num_seq=9), row=(6, 0))
    bad.save(str(tmp_path / "bad"), shard_size=4)
    with pytest.raises(ReplayBufferError, match="shard-00001.*teacher_tail_logprob"):
        ReplayBuffer.open(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="teacher_logprobs and teacher_tail_logprob"):
        ReplayBuffer.load(str(tmp_path / "bad"))


def test_mass_check_skips_rows_without_a_teacher_and_sampled_mode():
    b = make_buffer()
    assert not (b.teacher_ids[:, -1] >= 0).any()  # the last position of every sequence has no teacher
    b.teacher_tail_logprob[:, -1] = -5.0  # mass far from 1, but no teacher there
    b.validate()
    # mode "sampled": log frequencies of the slots, no tail semantics: only the upper bound
    sampled = make_buffer(mode="sampled")
    sampled.teacher_logprobs[0, 0, 0] = math.log(0.5)
    sampled.teacher_logprobs[0, 0, 1:] = -30.0
    sampled.teacher_tail_logprob[0, 0] = float("-inf")
    sampled.validate()
    assert "MASS_TOLERANCE" in dir(rb) and rb.MASS_TOLERANCE == 1e-3


# --------------------------------------------------------------------------------------------------
# Item 10: schema, duplicates and count mismatches, metadata integrity, temporaries, later rewrites
# --------------------------------------------------------------------------------------------------


SCHEMA_CASES = [
    (lambda m: m["shards"][0].pop("sha256"), r"shards\[0\]\.sha256"),
    (lambda m: m["shards"][1].pop("file"), r"shards\[1\]\.file"),
    (lambda m: m.update(shards=None), "'shards'"),
    (lambda m: m.update(shards={"0": 1}), "'shards'"),
    (lambda m: m["shards"].__setitem__(0, "shard-00000.safetensors"), r"'shards\[0\]'"),
    (lambda m: m["shards"][0].update(sha256="00" * 31), r"shards\[0\]\.sha256"),
    (lambda m: m["shards"][0].update(sha256=7), r"shards\[0\]\.sha256"),
    (lambda m: m["shards"][0].update(num_sequences=-4), r"shards\[0\]\.num_sequences"),
    (lambda m: m["shards"][2].update(num_tokens="12"), r"shards\[2\]\.num_tokens"),
    (lambda m: m.update(num_sequences=-1), "'num_sequences'"),
    (lambda m: m.update(num_sequences=True), "'num_sequences'"),
    (lambda m: m.pop("vocab_size"), "'vocab_size'.*missing"),
    (lambda m: m.update(k=0), "'k'"),
    (lambda m: m.update(mode="topk"), "'mode'"),
    (lambda m: m.update(logprob_dtype="int8"), "'logprob_dtype'"),
    (lambda m: m.update(complete="yes"), "'complete'"),
    (lambda m: m.update(shard_size=None), "'shard_size'"),
    # duplicated, dropped and moved entries
    (lambda m: m["shards"].insert(1, dict(m["shards"][0])), r"shards\[1\]\.file.*duplicated, dropped or moved"),
    (lambda m: m["shards"].pop(1), r"shards\[1\]\.file.*duplicated, dropped or moved"),
    (lambda m: m["shards"].pop(), "'num_sequences' says 9 but its shards hold 8"),
    (lambda m: m.update(num_tokens=m["num_tokens"] + 1), "'num_tokens' says"),
    (lambda m: m["shards"][0].update(num_sequences=3), r"shards\[0\]\.num_sequences"),
    (lambda m: m["shards"][1].update(file="shard-00001-g1.safetensors"), r"shards\[1\]\.file.*another save"),
]


@pytest.mark.parametrize("edit, match", SCHEMA_CASES, ids=[str(i) for i in range(len(SCHEMA_CASES))])
def test_metadata_that_breaks_the_schema_is_refused_naming_the_field(tmp_path, edit, match):
    path = saved(tmp_path)
    rewrite_metadata(path, edit)
    for load in LOADERS.values():
        with pytest.raises(ReplayBufferError, match=match):
            load(path)


@pytest.mark.parametrize("field, value, match", [
    ("mode", "sampled", "written with mode=tail"),
    ("vocab_size", VOCAB + 3, "written with vocab_size"),
    ("k", 3, "k=3"),
    ("logprob_dtype", "float16", "logprob_dtype='float16'"),
])
@FORMAT_VERSIONS
def test_metadata_contradicting_its_shards_is_refused(tmp_path, field, value, match, format_version):
    path = saved(tmp_path, format_version=format_version)
    rewrite_metadata(path, lambda meta: meta.update({field: value}))
    for load in LOADERS.values():
        with pytest.raises(ReplayBufferError, match=match):
            load(path, validate=False)


def drop_last_shard_and_fix_the_counts(meta):
    last = meta["shards"].pop()
    meta.update(num_sequences=meta["num_sequences"] - last["num_sequences"],
                num_tokens=meta["num_tokens"] - last["num_tokens"])


@pytest.mark.parametrize("edit", [lambda m: m.update(mode="sampled"), drop_last_shard_and_fix_the_counts,
                                  lambda m: m.update(temperature=0.5)], ids=["mode", "dropped", "temperature"])
@FORMAT_VERSIONS
def test_an_edited_metadata_file_is_detected(tmp_path, edit, format_version):
    path = saved(tmp_path, format_version=format_version)
    meta = raw_metadata(path)
    assert len(meta["metadata_sha256"]) == 64
    edit(meta)
    write_raw_metadata(path, meta)
    for load in LOADERS.values():
        with pytest.raises(ReplayBufferError, match="was changed after it was written"):
            load(path)


def test_metadata_written_before_its_digest_existed_still_loads(tmp_path):
    path = saved(tmp_path)
    meta = raw_metadata(path)
    del meta["metadata_sha256"]
    write_raw_metadata(path, meta)
    assert_same(ReplayBuffer.load(path), make_buffer(num_seq=9))
    assert "metadata_sha256" not in ReplayBuffer.load(path).metadata
    assert len(ReplayBuffer.open(path)) == 9


def test_stale_temporaries_are_removed_by_the_next_writer_and_nothing_else(tmp_path):
    path = saved(tmp_path)
    stale = [".shard-00001.safetensors.4242.0123456789abcdef.tmp", ".metadata.json.7.fedcba9876543210.tmp",
             ".shard-00000-g1.safetensors.1.00000000000000aa.tmp"]
    foreign = [".notes.txt.4242.0123456789abcdef.tmp", ".mine.tmp", "data.tmp",
               ".shard-00001.safetensors.x.0123456789abcdef.tmp"]
    for name in stale + foreign:
        open(os.path.join(path, name), "wb").write(b"partial")
    ReplayBuffer.load(path)  # a reader removes nothing
    assert set(stale + foreign) <= set(os.listdir(path))
    make_buffer(seed=2).save(path, overwrite=True, shard_size=4)
    left = set(os.listdir(path))
    assert not left & set(stale) and set(foreign) <= left
    # the resumable writer (generate_replay, build_teacher_cache) cleans up too
    for name in stale:
        open(os.path.join(tmp_path, "buf", name), "wb").write(b"partial")
    cache = tmp_path / "cache"
    cache.mkdir()
    open(cache / stale[0], "wb").write(b"partial")
    with rb.ShardedBufferWriter(cache, "unit", {"a": 1}, {}, 4, 1, producer="test"):
        assert os.listdir(cache) == [".lock"]


@FORMAT_VERSIONS
def test_a_shard_rewritten_after_open_with_its_mtime_restored_is_detected(tmp_path, format_version):
    path = saved(tmp_path, num_seq=12, format_version=format_version)
    shard = os.path.join(path, "shard-00001.safetensors")
    before = os.stat(shard)
    lazy = ReplayBuffer.open(path)
    time.sleep(0.05)  # past the file system clock's tick (a rewrite within one tick of opening is the known gap)
    data = bytearray(open(shard, "rb").read())
    data[-3] ^= 0x04  # same size
    with open(shard, "r+b") as handle:  # in place: same inode
        handle.write(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (os.stat(shard).st_size, os.stat(shard).st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(ReplayBufferError, match="shard-00001.*changed since the buffer was opened"):
        list(lazy.batches(4, shuffle=False))
    # replaced by another file (another inode) with the same size and mtime: detected too
    lazy = ReplayBuffer.open(path, verify_checksums=False, validate=False)
    os.replace(shard, shard + ".moved")
    with open(shard, "wb") as handle:
        handle.write(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ReplayBufferError, match="changed since the buffer was opened"):
        lazy.shard(1)


def test_a_lazy_reader_of_an_overwritten_buffer_fails_and_never_reads_the_new_rows(tmp_path):
    path = saved(tmp_path, num_seq=12)
    lazy = ReplayBuffer.open(path)
    make_buffer(seed=4, num_seq=12).save(path, shard_size=4, overwrite=True)  # old shards deleted
    with pytest.raises(ReplayBufferError, match="cannot read shard"):
        next(lazy.batches(4))
    lazy = ReplayBuffer.open(path)
    time.sleep(0.05)
    make_buffer(seed=5, num_seq=12).save(path, shard_size=4, overwrite=True)  # back to the first names
    lazy_first = ReplayBuffer.open(path)
    make_buffer(seed=6, num_seq=12).save(path, shard_size=4, overwrite=True)  # and those names' files replaced
    for reader in (lazy, lazy_first):
        with pytest.raises(ReplayBufferError, match="cannot read shard|changed since the buffer was opened"):
            next(reader.batches(4))
