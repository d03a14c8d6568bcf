"""ReplayBuffer.stream (replay_stream.py) and ReplayBuffer.split: an endless, resumable replay stream split
over ranks, checked against the passes of buffer.batches it is made of."""

import pytest
import torch

import selfreplay_fast as sf

VOCAB = 23


def _buffer(num_sequences=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 9, (num_sequences,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(1, VOCAB, (num_sequences, width), generator=g)
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = 0  # pad_token_id after each sequence, as saved
    teacher = torch.full((num_sequences, width, 2), -1, dtype=torch.int32)
    logprobs = torch.zeros(num_sequences, width, 2)
    tail = torch.full((num_sequences, width), float("-inf"))
    for i, n in enumerate(lengths.tolist()):
        teacher[i, : n - 1, 0] = ids[i, 1:n].to(torch.int32)  # a k = 1 teacher: the next token, mass 1
    return sf.ReplayBuffer(ids, lengths, teacher, logprobs, tail, vocab_size=VOCAB)


def _indices(batches):
    return [b["indices"].tolist() for b in batches]


def test_stream_is_the_passes_one_after_the_other():
    buffer = _buffer(7)  # batches of 3: 3 per pass (the last one short)
    stream = buffer.stream(3, seed=5)
    got = [next(stream) for _ in range(10)]
    expected = [b for p in range(4) for b in buffer.batches(3, seed=5 + p)][:10]
    assert _indices(got) == _indices(expected)
    for a, b in zip(got, expected):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert stream.position == 10 and stream.passes == 3


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_split_the_single_process_stream(world_size):
    buffer = _buffer(7)
    one = buffer.stream(2, seed=1)
    single = _indices(next(one) for _ in range(4 * world_size))  # 4 batches per pass
    streams = [buffer.stream(2, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [[next(s) for _ in range(4)] for s in streams]
    interleaved = [per_rank[r][i]["indices"].tolist() for i in range(4) for r in range(world_size)]
    assert interleaved == single
    assert all(s.position == 4 * world_size for s in streams)


def test_state_dict_resumes_exactly_also_under_another_world_size():
    buffer = _buffer(7)
    straight = buffer.stream(2, seed=3)
    expected = _indices(next(straight) for _ in range(9))
    first = buffer.stream(2, seed=3)
    taken = [next(first) for _ in range(4)]
    state = first.state_dict()
    resumed = buffer.stream(2, seed=3)
    resumed.load_state_dict(state)
    assert _indices(taken) + _indices(next(resumed) for _ in range(5)) == expected
    # two ranks continue from position 4: together they yield the single stream's batches 4..7
    pair = [buffer.stream(2, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in pair:
        s.load_state_dict(state)
    assert [next(pair[r])["indices"].tolist() for _ in range(2) for r in range(2)] == expected[4:8]
    with pytest.raises(ValueError, match="seed: 3 there, 4 here"):
        buffer.stream(2, seed=4).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        buffer.stream(3, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="state"):
        buffer.stream(2).load_state_dict({"position": 1})


def test_sharded_buffer_streams_the_same_batches(tmp_path):
    buffer = _buffer(9)
    buffer.save(str(tmp_path / "b"), shard_size=4)
    lazy = sf.ReplayBuffer.open(str(tmp_path / "b"))
    a, b = buffer.stream(4, seed=2), lazy.stream(4, seed=2)
    for _ in range(7):
        x, y = next(a), next(b)
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_stream_bad_input():
    buffer = _buffer(3)
    for kwargs, match in ((dict(batch_size=0), "batch_size"), (dict(batch_size=2, rank=2, world_size=2), "rank"),
                          (dict(batch_size=2, world_size=0), "world_size"),
                          (dict(batch_size=4, drop_last=True), "no batch")):
        with pytest.raises(ValueError, match=match):
            buffer.stream(**kwargs)
    with pytest.raises(TypeError, match="seed"):
        buffer.stream(2, seed="0")


def test_split_is_reproducible_disjoint_and_complete():
    buffer = _buffer(10)
    train, held = buffer.split(0.3, seed=7)
    assert len(held) == 3 and len(train) == 7
    again_train, again_held = buffer.split(3, seed=7)
    assert again_held.sequences() == held.sequences() and again_train.sequences() == train.sequences()
    all_rows = buffer.sequences()
    held_rows = [all_rows[i] for i in sorted(torch.randperm(10, generator=torch.Generator().manual_seed(7))[:3].tolist())]
    assert held.sequences() == held_rows
    assert sorted(map(tuple, train.sequences() + held.sequences())) == sorted(map(tuple, all_rows))
    assert len({tuple(map(tuple, buffer.split(3, seed=s)[1].sequences())) for s in range(6)}) > 1  # seed matters
    for bad, err in ((0, ValueError), (10, ValueError), (1.0, ValueError), (0.0, ValueError), ("1", TypeError),
                     (True, TypeError)):
        with pytest.raises(err, match="holdout"):
            buffer.split(bad)
    with pytest.raises(ValueError, match="holdout"):
        _buffer(1).split(0.5)
