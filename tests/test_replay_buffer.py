"""Tests of ReplayBuffer: format, save/load round trip, atomic writes, checksums, vocabulary check,
validation of teacher values, concatenation and training batches."""

import json
import os

import pytest
import torch

from selfreplay_fast import replay_buffer as rb
from selfreplay_fast.replay_buffer import ReplayBuffer, ReplayBufferError

VOCAB, K = 37, 5


def make_buffer(num_seq=7, seed=0, logprob_dtype=torch.float32, mode="tail"):
    """A buffer built independently of the generator: random sequences, random next-token
    distributions, top-k and tail computed by plain torch ops."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (num_seq,), generator=g)
    width = int(lengths.max())
    input_ids = torch.zeros(num_seq, width, dtype=torch.long)
    teacher_ids = torch.full((num_seq, width, K), -1, dtype=torch.int32)
    teacher_lp = torch.zeros(num_seq, width, K)
    tail = torch.full((num_seq, width), float("-inf"))
    for i, n in enumerate(lengths.tolist()):
        input_ids[i, :n] = torch.randint(0, VOCAB, (n,), generator=g)
        logp = torch.log_softmax(torch.randn(n - 1, VOCAB, generator=g, dtype=torch.float64) * 3, -1)
        values, ids = logp.topk(K, -1)
        teacher_ids[i, : n - 1] = ids.int()
        teacher_lp[i, : n - 1] = values.float()
        tail[i, : n - 1] = logp.scatter(1, ids, float("-inf")).logsumexp(-1).float()
    return ReplayBuffer(input_ids, lengths, teacher_ids, teacher_lp.to(logprob_dtype), tail.to(logprob_dtype),
                        vocab_size=VOCAB, mode=mode, metadata={"model_name": "unit-test", "seed": seed})


def assert_same(a, b):
    assert len(a) == len(b)
    assert a.sequences() == b.sequences()
    for name in ("lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        x, y = getattr(a, name), getattr(b, name)
        w = min(x.shape[1], y.shape[1]) if x.dim() > 1 else None
        if w is None:
            assert torch.equal(x, y), name
        else:
            assert torch.equal(x[:, :w], y[:, :w]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip(tmp_path, dtype):
    buffer = make_buffer(logprob_dtype=dtype)
    buffer.save(str(tmp_path / "buf"), shard_size=3)
    files = sorted(os.listdir(tmp_path / "buf"))
    assert files == ["metadata.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    meta = json.loads((tmp_path / "buf" / "metadata.json").read_text())
    assert meta["format_version"] == rb.FORMAT_VERSION and meta["vocab_size"] == VOCAB and meta["k"] == K
    assert meta["num_sequences"] == 7 and meta["num_tokens"] == buffer.num_tokens and meta["complete"]
    assert meta["model_name"] == "unit-test"
    assert all(len(s["sha256"]) == 64 for s in meta["shards"])
    loaded = ReplayBuffer.load(str(tmp_path / "buf"), expected_vocab_size=VOCAB)
    assert loaded.teacher_logprobs.dtype == dtype
    assert loaded.vocab_size == VOCAB and loaded.mode == "tail" and loaded.metadata["seed"] == 0
    assert_same(buffer, loaded)


def test_save_refuses_existing_buffer_unless_overwrite(tmp_path):
    path = str(tmp_path / "buf")
    make_buffer(seed=0).save(path, shard_size=2)  # 4 shards
    with pytest.raises(FileExistsError):
        make_buffer(seed=1).save(path)
    # 2 shards under the other generation's names (the old ones stay whole until the switch), stale ones removed
    make_buffer(seed=1, num_seq=3).save(path, overwrite=True, shard_size=2)
    assert sorted(os.listdir(path)) == ["metadata.json", "shard-00000-g1.safetensors", "shard-00001-g1.safetensors"]
    assert_same(ReplayBuffer.load(path), make_buffer(seed=1, num_seq=3))
    make_buffer(seed=2, num_seq=5).save(path, overwrite=True, shard_size=4)  # and back to the plain names
    assert sorted(os.listdir(path)) == ["metadata.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    assert_same(ReplayBuffer.load(path), make_buffer(seed=2, num_seq=5))


def test_no_temporary_files_left_and_crash_before_metadata_is_not_a_buffer(tmp_path, monkeypatch):
    path = str(tmp_path / "buf")

    def crash(directory, metadata):
        raise OSError("disk full")

    monkeypatch.setattr(rb, "write_metadata", crash)
    with pytest.raises(OSError, match="disk full"):
        make_buffer().save(path, shard_size=3)
    with pytest.raises(FileNotFoundError, match="metadata.json is missing"):
        ReplayBuffer.load(path)
    assert not any(name.endswith(".tmp") for name in os.listdir(path))


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    rb.atomic_write_bytes(str(target), b"old")

    def boom(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(rb.os, "replace", boom)
    with pytest.raises(OSError):
        rb.atomic_write_bytes(str(target), b"new content")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]  # the temp file was removed


def test_checksum_corruption_is_detected(tmp_path):
    path = tmp_path / "buf"
    make_buffer().save(str(path), shard_size=4)
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one flipped bit in the tensor payload
    shard.write_bytes(bytes(data))
    with pytest.raises(ReplayBufferError, match="checksum mismatch for .*shard-00001"):
        ReplayBuffer.load(str(path))
    # explicitly opting out of verification still reads it
    ReplayBuffer.load(str(path), verify_checksums=False, validate=False)


def test_missing_shard_and_foreign_metadata(tmp_path):
    path = tmp_path / "buf"
    make_buffer().save(str(path), shard_size=4)
    (path / "shard-00000.safetensors").unlink()
    with pytest.raises(ReplayBufferError, match="cannot read shard"):
        ReplayBuffer.load(str(path))
    (path / "metadata.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ReplayBufferError, match="does not describe a selfreplay-fast replay buffer"):
        ReplayBuffer.load(str(path))
    (path / "metadata.json").write_text(json.dumps({"format": rb.FORMAT_NAME, "format_version": 99}))
    with pytest.raises(ReplayBufferError, match="format version 99"):
        ReplayBuffer.load(str(path))
    with pytest.raises(FileNotFoundError):
        ReplayBuffer.load(str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="directory"):
        ReplayBuffer.load(3)


def test_foreign_vocabulary_is_refused(tmp_path):
    make_buffer().save(str(tmp_path / "buf"))
    with pytest.raises(ValueError, match=f"made for a vocabulary of {VOCAB} tokens.*expected_vocab_size is 32000"):
        ReplayBuffer.load(str(tmp_path / "buf"), expected_vocab_size=32000)
    with pytest.raises(ValueError, match="expected_vocab_size"):
        ReplayBuffer.load(str(tmp_path / "buf"), expected_vocab_size=0)


def test_validate_accepts_good_and_rejects_each_bad_value():
    make_buffer().validate()
    make_buffer(logprob_dtype=torch.float16).validate()

    def broken(edit):
        b = make_buffer()
        edit(b)
        return b

    cases = [
        (lambda b: b.teacher_ids.__setitem__((0, 0, 0), VOCAB), "teacher_ids: expected ids in"),
        (lambda b: b.teacher_ids.__setitem__((0, 0, 0), -2), "teacher_ids: expected ids in"),
        (lambda b: b.teacher_ids.__setitem__((0, 0, 1), int(b.teacher_ids[0, 0, 0])), "duplicate"),
        (lambda b: b.teacher_logprobs.__setitem__((0, 0, 2), float("nan")), "finite"),
        (lambda b: b.teacher_logprobs.__setitem__((0, 0, 0), 0.5), "at most 1"),
        (lambda b: b.teacher_tail_logprob.__setitem__((0, 0), float("nan")), "teacher_tail_logprob"),
        (lambda b: b.teacher_tail_logprob.__setitem__((0, 0), 0.0), "at most 1"),  # top-k mass + 1 > 1
        (lambda b: b.input_ids.__setitem__((0, 0), VOCAB), "input_ids"),
        (lambda b: b.teacher_ids.__setitem__((0, int(b.lengths[0]), 0), 3) if b.lengths[0] < b.seq_len else
         b.teacher_ids.__setitem__((1, int(b.lengths[1]), 0), 3), "past the end"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            broken(edit).validate()


def test_load_refuses_invalid_values(tmp_path):
    b = make_buffer()
    b.teacher_ids[2, 0, 0] = VOCAB + 5
    b.save(str(tmp_path / "buf"))
    with pytest.raises(ValueError, match="teacher_ids"):
        ReplayBuffer.load(str(tmp_path / "buf"))


def test_constructor_checks():
    good = make_buffer()
    args = [good.input_ids, good.lengths, good.teacher_ids, good.teacher_logprobs, good.teacher_tail_logprob]
    with pytest.raises(ValueError, match="vocab_size"):
        ReplayBuffer(*args, vocab_size=0)
    with pytest.raises(ValueError, match="mode"):
        ReplayBuffer(*args, vocab_size=VOCAB, mode="topk")
    with pytest.raises(TypeError, match="teacher_ids must have dtype"):
        ReplayBuffer(args[0], args[1], args[2].float(), *args[3:], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="lengths must have shape"):
        ReplayBuffer(args[0], args[1][:-1], *args[2:], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="teacher_logprobs must have the shape"):
        ReplayBuffer(*args[:3], args[3][:, :, :2], args[4], vocab_size=VOCAB)
    with pytest.raises(ValueError, match="lengths must lie"):
        ReplayBuffer(args[0], args[1] * 0, *args[2:], vocab_size=VOCAB)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        ReplayBuffer([1], *args[1:], vocab_size=VOCAB)


def test_concat_and_select():
    a, b = make_buffer(num_seq=3, seed=1), make_buffer(num_seq=4, seed=2)
    both = ReplayBuffer.concat([a, b])
    assert len(both) == 7 and both.sequences() == a.sequences() + b.sequences()
    assert_same(both.select(slice(0, 3)), a)
    assert_same(both.select([3, 4, 5, 6]), b)
    with pytest.raises(ValueError, match="k="):
        other_k = make_buffer()
        other_k.teacher_ids = other_k.teacher_ids[:, :, :2]
        other_k.teacher_logprobs = other_k.teacher_logprobs[:, :, :2]
        ReplayBuffer.concat([a, other_k])
    with pytest.raises(ValueError, match="at least one"):
        ReplayBuffer.concat([])
    with pytest.raises(TypeError, match=r"buffers\[1\]"):
        ReplayBuffer.concat([a, "b"])


def test_batches_cover_every_sequence_once_and_are_aligned():
    buffer = make_buffer(num_seq=11)
    seen = []
    for batch in buffer.batches(4, shuffle=True, seed=3):
        idx = batch["indices"]
        seen += idx.tolist()
        width = batch["input_ids"].shape[1]
        assert width == int(buffer.lengths[idx].max())  # trimmed to the longest sequence
        for row, i in enumerate(idx.tolist()):
            n = int(buffer.lengths[i])
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert torch.equal(batch["input_ids"][row, :n], buffer.input_ids[i, :n])
            # position j carries the teacher for token j + 1: rows 0..n-2, never the last token or padding
            assert batch["mask"][row].tolist() == [True] * (n - 1) + [False] * (width - n + 1)
            assert torch.equal(batch["teacher_ids"][row, : n - 1], buffer.teacher_ids[i, : n - 1])
            assert torch.equal(batch["teacher_logprobs"][row], buffer.teacher_logprobs[i, :width])
            assert torch.equal(batch["teacher_tail_logprob"][row], buffer.teacher_tail_logprob[i, :width])
    assert sorted(seen) == list(range(11))
    again = [b["indices"].tolist() for b in buffer.batches(4, shuffle=True, seed=3)]
    other = [b["indices"].tolist() for b in buffer.batches(4, shuffle=True, seed=4)]
    assert [s for chunk in again for s in chunk] == seen and again != other
    assert [b["indices"].tolist() for b in buffer.batches(4, shuffle=False)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert len(list(buffer.batches(4, drop_last=True))) == 2 == buffer.num_batches(4, drop_last=True)
    batch = next(buffer.batches(4, trim=False, teacher_dtype=torch.float64))
    assert batch["input_ids"].shape[1] == buffer.seq_len and batch["teacher_logprobs"].dtype == torch.float64
    with pytest.raises(ValueError, match="batch_size"):
        next(buffer.batches(0))


def test_batches_feed_fused_replay_kl_reference():
    """Batches are accepted as-is by the replay KL (shapes, dtypes, masks, value checks)."""
    from selfreplay_fast.reference import reference_replay_kl

    buffer = make_buffer(num_seq=6)
    weight = torch.randn(VOCAB, 8, dtype=torch.float64)
    for batch in buffer.batches(3):
        hidden = torch.randn(*batch["input_ids"].shape, 8, dtype=torch.float64)
        loss = reference_replay_kl(hidden, weight, batch["teacher_ids"], batch["teacher_logprobs"], mask=batch["mask"],
                                   teacher_tail_logprob=batch["teacher_tail_logprob"])
        assert torch.isfinite(loss) and loss > 0


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_follow_the_umask(tmp_path):
    # Files must be created like open() creates them: a temp file from mkstemp is 0600, so a buffer
    # written by one user or job would be unreadable to the training jobs of another.
    previous = os.umask(0o022)
    try:
        make_buffer().save(str(tmp_path / "buf"), shard_size=4)
    finally:
        os.umask(previous)
    for name in os.listdir(tmp_path / "buf"):
        assert os.stat(tmp_path / "buf" / name).st_mode & 0o777 == 0o644, name


def test_empty_buffer_round_trip(tmp_path):
    t = make_buffer().select([])._tensors()
    empty = ReplayBuffer(*t.values(), vocab_size=VOCAB, pad_token_id=7)
    empty.save(str(tmp_path / "buf"))
    assert sorted(os.listdir(tmp_path / "buf")) == ["metadata.json"]
    loaded = ReplayBuffer.load(str(tmp_path / "buf"), expected_vocab_size=VOCAB)
    assert len(loaded) == 0 and loaded.k == K and loaded.pad_token_id == 7


def test_select_by_boolean_mask():
    buffer = make_buffer()
    long = buffer.lengths > 5
    assert buffer.select(long).sequences() == [s for s, keep in zip(buffer.sequences(), long.tolist()) if keep]
    with pytest.raises(ValueError, match="index"):
        buffer.select(long[:-1])


# --------------------------------------------------------------------------------------------------
# ShardedReplayBuffer: the lazy path (ReplayBuffer.open)
# --------------------------------------------------------------------------------------------------


def _saved(tmp_path, num_seq=23, shard_size=4, **kw):
    buffer = make_buffer(num_seq=num_seq, seed=3, **kw)
    path = str(tmp_path / "buf")
    buffer.save(path, shard_size=shard_size)
    return buffer, path


def _assert_batches_equal(expected, got):
    expected, got = list(expected), list(got)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_open_yields_exactly_the_in_memory_batches(tmp_path, dtype):
    buffer, path = _saved(tmp_path, logprob_dtype=dtype)
    loaded = ReplayBuffer.load(path, expected_vocab_size=VOCAB)
    lazy = ReplayBuffer.open(path, expected_vocab_size=VOCAB)
    assert isinstance(lazy, rb.ShardedReplayBuffer)
    assert (len(lazy), lazy.k, lazy.vocab_size, lazy.mode, lazy.seq_len, lazy.num_tokens, lazy.num_shards) == (
        len(loaded), loaded.k, loaded.vocab_size, loaded.mode, loaded.seq_len, loaded.num_tokens, 6)
    assert lazy.metadata == loaded.metadata and lazy.validated
    for kwargs in (dict(seed=0), dict(seed=5, drop_last=True), dict(shuffle=False), dict(seed=1, trim=False),
                   dict(seed=2, teacher_dtype=torch.bfloat16)):
        for batch_size in (1, 3, 4, 7, 40):
            _assert_batches_equal(loaded.batches(batch_size, **kwargs), lazy.batches(batch_size, **kwargs))
    assert lazy.num_batches(5) == loaded.num_batches(5)
    # every sequence and teacher row exactly once per pass
    seen = torch.cat([b["indices"] for b in lazy.batches(4, seed=9)])
    assert sorted(seen.tolist()) == list(range(len(buffer)))
    rows = sorted(tuple(r.tolist()) for b in lazy.batches(4, seed=9) for r in b["teacher_ids"][b["mask"]])
    assert rows == sorted(tuple(r.tolist()) for r in buffer.teacher_ids[buffer.teacher_ids[:, :, 0] >= 0])
    assert sum(p.num_tokens for p in lazy.shards()) == buffer.num_tokens


def test_start_and_stride_select_batches_of_the_pass_without_reading_the_others(tmp_path, monkeypatch):
    buffer, path = _saved(tmp_path)
    lazy = ReplayBuffer.open(path, expected_vocab_size=VOCAB)
    for source in (buffer, lazy):
        for kwargs in (dict(seed=4), dict(seed=4, drop_last=True), dict(shuffle=False)):
            every = list(source.batches(3, **kwargs))
            for start, stride in ((0, 1), (2, 1), (1, 2), (0, 3), (2, 5), (len(every), 1), (len(every) + 3, 2)):
                _assert_batches_equal(every[start::stride], source.batches(3, start=start, stride=stride, **kwargs))
    read = []
    original = rb.ShardedReplayBuffer._rows
    monkeypatch.setattr(rb.ShardedReplayBuffer, "_rows", lambda self, idx, width: read.append(idx) or original(self, idx, width))
    assert len(list(lazy.batches(3, seed=4, start=2, stride=3))) == len(range(2, lazy.num_batches(3), 3))
    assert len(read) == len(range(2, lazy.num_batches(3), 3))  # only the selected batches were read
    for bad in (dict(start=-1), dict(start=1.5), dict(stride=0), dict(stride=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            next(buffer.batches(3, **bad))


def test_open_holds_at_most_one_shard_and_batches_load_none(tmp_path, monkeypatch):
    _, path = _saved(tmp_path)
    live, peak, loads = [0], [0], [0]
    original = rb.ShardedReplayBuffer._load_shard

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        loads[0] += 1
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        import weakref

        weakref.finalize(out["lengths"], lambda: live.__setitem__(0, live[0] - 1))
        return out

    monkeypatch.setattr(rb.ShardedReplayBuffer, "_load_shard", staticmethod(counting))
    lazy = ReplayBuffer.open(path)
    assert loads[0] == 6 and peak[0] == 1  # streamed: one shard in memory at a time
    lazy.validate()
    assert loads[0] == 12 and peak[0] == 1
    loads[0] = 0
    for batch in lazy.batches(3, seed=0):
        assert batch["input_ids"].shape[0] <= 3
    assert loads[0] == 0  # batches read only their rows, never a whole shard


def test_open_detects_corruption_and_later_modification(tmp_path):
    _, path = _saved(tmp_path)
    shard = os.path.join(path, "shard-00002.safetensors")
    data = bytearray(open(shard, "rb").read())
    lazy = ReplayBuffer.open(path)
    data[-3] ^= 0xFF
    with open(shard, "wb") as handle:
        handle.write(bytes(data))
    os.utime(shard, ns=(1, 1))
    with pytest.raises(ReplayBufferError, match="changed since the buffer was opened"):
        list(lazy.batches(4, shuffle=False))
    with pytest.raises(ReplayBufferError, match="checksum mismatch for .*shard-00002"):
        ReplayBuffer.open(path)
    os.unlink(shard)
    with pytest.raises(ReplayBufferError, match="cannot read shard"):
        ReplayBuffer.open(path)


def test_open_validates_values_and_refuses_a_foreign_vocabulary(tmp_path):
    buffer, path = _saved(tmp_path)
    with pytest.raises(ReplayBufferError, match=f"made for a vocabulary of {VOCAB} tokens.*expected_vocab_size is 32000"):
        ReplayBuffer.open(path, expected_vocab_size=32000)
    bad = make_buffer(num_seq=9, seed=3)
    bad.teacher_ids[6, 0, 0] = VOCAB  # outside the vocabulary, in the second shard
    bad.save(str(tmp_path / "bad"), shard_size=4)
    with pytest.raises(ReplayBufferError, match="shard-00001.*teacher_ids"):
        ReplayBuffer.open(str(tmp_path / "bad"))
    lazy = ReplayBuffer.open(str(tmp_path / "bad"), validate=False)
    assert not lazy.validated and len(lazy) == 9
    with pytest.raises(ReplayBufferError, match="teacher_ids"):
        lazy.validate()


def test_trainer_accepts_a_sharded_buffer(tmp_path):
    pytest.importorskip("transformers")
    import test_training as tt

    teacher = tt.tiny_model(seed=1).eval()
    cache = tmp_path / "cache"
    import selfreplay_fast as sf

    sf.build_teacher_cache(teacher, tt.sequences(5, [7, 12, 9, 4, 11, 8, 10, 6]), 4, cache, shard_size=3,
                           progress=False)
    in_memory = tt.make_trainer(tmp_path / "a", tt.tiny_model(seed=0), str(cache))
    lazy = tt.make_trainer(tmp_path / "b", tt.tiny_model(seed=0), ReplayBuffer.open(cache))
    assert isinstance(lazy.replay_buffer, rb.ShardedReplayBuffer)
    for _ in range(6):  # crosses a pass over the 8 sequences (batches of 2)
        _assert_batches_equal([in_memory.next_replay_batch()], [lazy.next_replay_batch()])
    with pytest.raises(ValueError, match="vocabulary"):
        tt.make_trainer(tmp_path / "c", tt.tiny_model(seed=0, vocab_size=tt.VOCAB + 1), ReplayBuffer.open(cache))


def test_filter_keeps_exactly_the_sequences_the_predicate_accepts():
    buffer = make_buffer(num_seq=12, seed=6)
    banned = buffer.sequences()[3][1]
    kept = buffer.filter(lambda ids: banned not in ids)
    expected = [i for i, seq in enumerate(buffer.sequences()) if banned not in seq]
    assert 0 < len(expected) < 12  # the case is not trivial
    assert_same(kept, buffer.select(expected))
    assert kept.sequences() == [s for s in buffer.sequences() if banned not in s]
    assert len(buffer.filter(lambda ids: False)) == 0 and len(buffer.filter(lambda ids: True)) == 12
    with pytest.raises(TypeError, match="predicate must be callable"):
        buffer.filter("not a function")
    with pytest.raises(TypeError, match="predicate must return a bool"):
        buffer.filter(lambda ids: ids)
