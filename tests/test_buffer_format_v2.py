"""Replay-buffer format v2 (issue #12, item 3): ragged shards with narrow ids, the sampled token's log-prob,
16-bit log-probs and their effect on the loss, bytes per token; v1 buffers (committed fixtures written by the
v1 code, and v1 written on request) still load."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import selfreplay_fast as sf
from selfreplay_fast import buffer_layout
from selfreplay_fast import replay_buffer as rb
from selfreplay_fast.replay_buffer import ReplayBuffer, ReplayBufferError
from test_buffer_integrity import rewrite_metadata
from test_replay_buffer import VOCAB, assert_same, make_buffer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LOADERS = {"load": ReplayBuffer.load, "open": ReplayBuffer.open}


def with_sampled(buffer, seed=0):
    """``buffer`` plus a sampled_logprobs field: a negative value on every teacher row, 0 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    has_row = buffer.teacher_ids[..., 0] >= 0
    values = -torch.rand(buffer.input_ids.shape, generator=g) * 5
    return ReplayBuffer.from_tensors({**buffer._tensors(), "sampled_logprobs": torch.where(has_row, values, 0.0)},
                                     vocab_size=buffer.vocab_size, mode=buffer.mode, pad_token_id=buffer.pad_token_id,
                                     metadata=buffer.metadata)


def all_rows(buffer, batch_size=3):
    """Every batch of an unshuffled pass, concatenated per tensor (padded batches cut to each sequence)."""
    out = []
    for batch in buffer.batches(batch_size, shuffle=False):
        for row, n in enumerate(batch["lengths"].tolist()):
            out.append({name: t[row, :n] for name, t in batch.items() if t.dim() >= 2})
    return out


# --------------------------------------------------------------------------------------------------
# v1 still loads
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1_buffer_tail", "v1_buffer_fp16"])
@pytest.mark.parametrize("how", sorted(LOADERS))
def test_a_v1_buffer_written_by_the_v1_code_loads(name, how):
    expected = torch.load(os.path.join(FIXTURES, name + ".expected.pt"))
    path = os.path.join(FIXTURES, name)
    assert json.load(open(os.path.join(path, "metadata.json")))["format_version"] == 1
    buffer = LOADERS[how](path, expected_vocab_size=VOCAB)
    if how == "open":
        buffer = ReplayBuffer.concat(list(buffer.shards()))
    reference = ReplayBuffer.from_tensors(expected, vocab_size=VOCAB, mode="tail", pad_token_id=0)
    assert_same(buffer, reference)
    assert buffer.sampled_logprobs is None


def test_v1_and_v2_of_one_buffer_give_the_same_batches(tmp_path):
    buffer = make_buffer(num_seq=11, seed=3)
    buffer.save(tmp_path / "v1", shard_size=4, format_version=1)
    buffer.save(tmp_path / "v2", shard_size=4)
    assert json.load(open(tmp_path / "v1" / "metadata.json"))["format_version"] == 1
    assert json.load(open(tmp_path / "v2" / "metadata.json"))["format_version"] == 2
    assert set(load_file(tmp_path / "v1" / "shard-00000.safetensors")) == set(rb.TENSOR_NAMES)
    for how, load in LOADERS.items():
        for a, b in zip(all_rows(load(tmp_path / "v1")), all_rows(load(tmp_path / "v2"))):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[name], b[name]) for name in a), how
    assert_same(ReplayBuffer.load(tmp_path / "v2"), buffer)


def test_a_v1_save_of_a_buffer_with_sampled_logprobs_drops_the_field_and_says_so(tmp_path):
    with_sampled(make_buffer()).save(tmp_path / "v1", format_version=1)
    loaded = ReplayBuffer.load(tmp_path / "v1")
    assert loaded.sampled_logprobs is None and loaded.metadata["sampled_logprobs"] is False
    with pytest.raises(ValueError, match="format_version"):
        make_buffer().save(tmp_path / "v3", format_version=3)


# --------------------------------------------------------------------------------------------------
# Ragged storage and narrow ids
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [2, 255, 65535, 65536, 128256, 1 << 20])
def test_ids_pack_and_unpack_exactly_at_every_vocabulary_edge(vocab):
    k = 11  # not a multiple of 8: the bit-packing pads
    g = torch.Generator().manual_seed(vocab)
    ids = torch.randint(-1, vocab, (50, k), generator=g, dtype=torch.int64)
    ids[0, : min(k, vocab + 1)] = torch.arange(-1, min(k, vocab + 1) - 1)
    ids[1, :] = vocab - 1
    ids[2, :] = -1
    packed = buffer_layout.pack_ids(ids.int(), vocab)
    assert packed["teacher_ids"].dtype == torch.uint16
    high_bits = max(0, vocab.bit_length() - 16)  # bits of id + 1 in [0, V] beyond 16
    assert ("teacher_ids_high" in packed) == (high_bits > 0)
    if high_bits:
        assert packed["teacher_ids_high"].shape == (50, high_bits * 2) and packed["teacher_ids_high"].dtype == torch.uint8
    back = buffer_layout.unpack_ids(packed["teacher_ids"], packed.get("teacher_ids_high"), vocab, k)
    assert back.dtype == torch.int32 and torch.equal(back.long(), ids)
    assert buffer_layout.token_dtype(vocab) == (torch.uint16 if vocab <= 65536 else torch.int32)


def test_shards_hold_no_padding(tmp_path):
    buffer = with_sampled(make_buffer(num_seq=9, seed=1))
    buffer.save(tmp_path / "b", shard_size=9)
    shard = load_file(tmp_path / "b" / "shard-00000.safetensors")
    tokens = buffer.num_tokens
    assert tokens < len(buffer) * buffer.seq_len  # the buffer is ragged, so padding would show
    assert shard["tokens"].shape == (tokens,) and shard["tokens"].dtype == torch.uint16
    assert shard["teacher_ids"].shape == (tokens, buffer.k) and shard["teacher_logprobs"].shape == (tokens, buffer.k)
    assert shard["teacher_tail_logprob"].shape == (tokens,) and shard["sampled_logprobs"].shape == (tokens,)
    expected = torch.cat([buffer.input_ids[i, :n] for i, n in enumerate(buffer.lengths.tolist())])
    assert torch.equal(shard["tokens"].long(), expected)


def test_bytes_per_token_at_llama3_vocabulary_and_k64_is_at_most_300(tmp_path):
    vocab, k, num_seq, length = 128256, 64, 6, 120
    g = torch.Generator().manual_seed(0)
    lengths = torch.full((num_seq,), length)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(num_seq * length)]).view(num_seq, length, k)
    ids[:, -1] = -1  # the last token predicts nothing
    lp = torch.log_softmax(torch.randn(num_seq, length, k + 1, generator=g), -1)
    has_row = ids[..., 0] >= 0
    buffer = ReplayBuffer(torch.randint(0, vocab, (num_seq, length), generator=g), lengths, ids.int(),
                          torch.where(has_row[..., None], lp[..., :k], 0.0).half(),
                          torch.where(has_row, lp[..., k], float("-inf")).half(), vocab_size=vocab,
                          sampled_logprobs=torch.where(has_row, lp[..., 0], 0.0))
    buffer.validate()
    for version in (1, 2):
        buffer.save(tmp_path / f"v{version}", shard_size=2, format_version=version)
    size = {v: sum(os.path.getsize(tmp_path / f"v{v}" / f) for f in os.listdir(tmp_path / f"v{v}")
                   if f.endswith(".safetensors")) for v in (1, 2)}
    tokens = buffer.num_tokens
    assert size[2] / tokens <= 300, size[2] / tokens
    # the tensor data is exactly 2 (token) + 2 * 64 + 8 (17-bit ids) + 2 * 65 (float16) + 4 (float32) per token
    meta = json.load(open(tmp_path / "v2" / "metadata.json"))
    assert meta["bytes_per_token"] == 4 + 128 + 8 + 130 + 4 == buffer.describe()["bytes_per_token"]
    assert size[1] / tokens >= 8 + 4 * 64 + 2 * 65  # v1: int64 tokens, int32 ids (and no sampled field)
    assert_same(ReplayBuffer.load(tmp_path / "v2"), buffer)
    assert torch.equal(ReplayBuffer.load(tmp_path / "v2").sampled_logprobs, buffer.sampled_logprobs)


# --------------------------------------------------------------------------------------------------
# The sampled log-prob field through every buffer operation
# --------------------------------------------------------------------------------------------------


def test_sampled_logprobs_survive_save_load_open_batches_stream_select_split_concat(tmp_path):
    buffer = with_sampled(make_buffer(num_seq=10, seed=2))
    buffer.save(tmp_path / "b", shard_size=3)
    loaded = ReplayBuffer.load(tmp_path / "b")
    assert torch.equal(loaded.sampled_logprobs, buffer.sampled_logprobs)
    opened = ReplayBuffer.open(tmp_path / "b")
    assert opened.has_sampled_logprobs and torch.equal(ReplayBuffer.concat(list(opened.shards())).sampled_logprobs,
                                                      buffer.sampled_logprobs)
    for source in (buffer, loaded, opened):
        for batch in source.batches(4, seed=1):
            expected = buffer.sampled_logprobs[batch["indices"], : batch["input_ids"].shape[1]]
            assert torch.equal(batch["sampled_logprobs"], expected)
        batch = next(iter(source.stream(4, seed=5)))
        assert torch.equal(batch["sampled_logprobs"], buffer.sampled_logprobs[batch["indices"], : batch["input_ids"].shape[1]])
    part = buffer.select([7, 2])
    assert torch.equal(part.sampled_logprobs, buffer.sampled_logprobs[[7, 2], : part.seq_len])
    train, held = buffer.split(3, seed=0)
    assert sorted(torch.cat([train.sampled_logprobs.sum(1), held.sampled_logprobs.sum(1)]).tolist()) == \
        sorted(buffer.sampled_logprobs.sum(1).tolist())
    assert torch.equal(ReplayBuffer.concat([train, held]).sampled_logprobs.sum(), train.sampled_logprobs.sum() + held.sampled_logprobs.sum())
    # a part without the field drops it from a concatenation instead of reading as zeros
    assert ReplayBuffer.concat([buffer, make_buffer()]).sampled_logprobs is None
    assert "sampled_logprobs" not in next(iter(make_buffer().batches(2)))


def test_validate_refuses_sampled_logprobs_that_are_not_log_probabilities():
    buffer = with_sampled(make_buffer())
    bad = buffer.sampled_logprobs.clone()
    row = (buffer.teacher_ids[0, :, 0] >= 0).nonzero()[0, 0]
    for value in (float("nan"), 0.5, float("-inf")):
        bad[0, row] = value
        with pytest.raises(ValueError, match="sampled_logprobs"):
            ReplayBuffer.from_tensors({**buffer._tensors(), "sampled_logprobs": bad}, vocab_size=VOCAB,
                                      mode="tail", pad_token_id=0).validate()
    bad = buffer.sampled_logprobs.clone()
    bad[0, buffer.lengths[0] - 1] = -1.0  # the last row has no teacher: it must hold 0
    with pytest.raises(ValueError, match="sampled_logprobs"):
        ReplayBuffer.from_tensors({**buffer._tensors(), "sampled_logprobs": bad}, vocab_size=VOCAB, mode="tail",
                                  pad_token_id=0).validate()


# --------------------------------------------------------------------------------------------------
# Integrity of v2 shards
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(LOADERS))
def test_metadata_claiming_a_field_the_shards_lack_or_another_version_is_refused(tmp_path, how):
    make_buffer(num_seq=6).save(tmp_path / "b", shard_size=3)
    rewrite_metadata(tmp_path / "b", lambda meta: meta.update(sampled_logprobs=True))
    with pytest.raises(ReplayBufferError, match="lacks tensors.*sampled_logprobs"):
        LOADERS[how](tmp_path / "b", validate=False)
    with_sampled(make_buffer(num_seq=6)).save(tmp_path / "c", shard_size=3)
    rewrite_metadata(tmp_path / "c", lambda meta: meta.update(sampled_logprobs=False))
    with pytest.raises(ReplayBufferError, match="does not describe"):
        LOADERS[how](tmp_path / "c", validate=False)
    rewrite_metadata(tmp_path / "c", lambda meta: meta.update(format_version=1, sampled_logprobs=False))
    with pytest.raises(ReplayBufferError, match="format_version=2"):
        LOADERS[how](tmp_path / "c", validate=False)


@pytest.mark.parametrize("how", sorted(LOADERS))
def test_a_shard_entry_whose_token_count_disagrees_with_the_lengths_is_refused(tmp_path, how):
    buffer = make_buffer(num_seq=6)
    buffer.save(tmp_path / "b", shard_size=6)

    def move_a_token(meta):  # same total, other width: only the shard's own lengths can tell
        meta["shards"][0]["seq_len"] += 1

    rewrite_metadata(tmp_path / "b", move_a_token)
    with pytest.raises(ReplayBufferError, match="lengths do not add up"):
        LOADERS[how](tmp_path / "b", validate=False)


# --------------------------------------------------------------------------------------------------
# 16-bit log-probs: the effect on fused_replay_kl
# --------------------------------------------------------------------------------------------------


def test_float16_cache_changes_the_replay_loss_by_less_than_1e_3_relative():
    """A teacher over V = 4096 at k = 64 and a student that drifted from it (KL ~0.03 to ~0.3 nats): the loss
    from a float16 cache is within 1e-3 relative of the float64 reference on the exact teacher (measured
    3e-5 to 4e-5 here, 4e-4 at V = 32000; docs/design.md), as is the float32 cache's."""
    torch.manual_seed(0)
    vocab, k, positions, dim = 4096, 64, 512, 64
    weight = torch.randn(vocab, dim, dtype=torch.float64) * 3 / dim**0.5
    teacher_hidden = torch.randn(positions, dim, dtype=torch.float64)
    for drift in (0.1, 0.3):
        student = teacher_hidden + drift * torch.randn(positions, dim, dtype=torch.float64)
        logp = torch.log_softmax(teacher_hidden @ weight.T, -1)
        top = logp.topk(k, -1)
        tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
        ids = top.indices.int()[None]
        exact = float(sf.reference_replay_kl(student[None], weight, ids, top.values[None], teacher_tail_logprob=tail[None]))
        assert exact > 0.02
        for dtype in (torch.float32, torch.float16):
            loss = float(sf.fused_replay_kl(student.float()[None], weight.float(), ids, top.values.to(dtype)[None],
                                            teacher_tail_logprob=tail.to(dtype)[None]))
            assert abs(loss - exact) / exact < 1e-3, (drift, dtype, abs(loss - exact) / exact)


def test_float16_cache_batches_hold_a_normalized_teacher_so_the_kl_cannot_go_negative():
    """Rounding the top-k and the tail to float16 leaves the teacher's mass off 1 by up to ~1e-3, enough for
    the replay KL of a student equal to the teacher to come out negative (seen as -1.6e-5 in the example
    script's log). Batches of a 16-bit cache are upcast and renormalized in float64 (tail mode: slots and
    tail; logsumexp = 0), so the KL of the teacher against itself is zero up to float32 rounding."""
    torch.manual_seed(1)
    vocab, k, seqs, width, dim = 512, 16, 6, 9, 32
    weight = torch.randn(vocab, dim) * 4 / dim**0.5
    hidden = torch.randn(seqs, width, dim)
    logp = torch.log_softmax((hidden @ weight.T).double(), -1)
    top = logp.topk(k, -1)
    tail = logp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    lengths = torch.full((seqs,), width + 1)
    input_ids = torch.randint(0, vocab, (seqs, width + 1))
    ids = torch.cat([top.indices, torch.full((seqs, 1, k), -1)], 1).int()
    lp = torch.cat([top.values, torch.zeros(seqs, 1, k, dtype=torch.float64)], 1).half()
    tl = torch.cat([tail, torch.zeros(seqs, 1, dtype=torch.float64)], 1).half()
    raw_mass = torch.cat([lp[:, :width].double(), tl[:, :width, None].double()], -1).logsumexp(-1)
    assert raw_mass.abs().max() > 1e-5  # the rounding this test is about
    buffer = ReplayBuffer(input_ids, lengths, ids, lp, tl, vocab_size=vocab, mode="tail")
    (batch,) = buffer.batches(seqs, shuffle=False, trim=False)
    assert batch["teacher_logprobs"].dtype == torch.float32 and batch["teacher_tail_logprob"].dtype == torch.float32
    m = batch["mask"]
    mass = torch.cat([batch["teacher_logprobs"].double(), batch["teacher_tail_logprob"][..., None].double()], -1)
    assert mass.logsumexp(-1)[m].abs().max() < 1e-6
    padded = torch.cat([hidden, torch.zeros(seqs, 1, dim)], 1)
    kl = sf.fused_replay_kl(padded, weight, batch["teacher_ids"], batch["teacher_logprobs"], mask=m,
                            teacher_tail_logprob=batch["teacher_tail_logprob"], reduction="none")
    assert kl[m].min() > -1e-6, kl[m].min()


def test_a_generation_begun_by_the_v1_code_finishes_in_v1(tmp_path):
    """A directory that an older selfreplay-fast began (format v1, one shard written) is resumed in its own
    format, so that one buffer never mixes two shard layouts; the result equals an uninterrupted run."""
    from test_generation import build_model

    model = build_model("llama", 0)
    kwargs = dict(num_sequences=10, max_new_tokens=5, top_k=3, batch_size=2, shard_size=4, seed=1, progress=False)
    straight = sf.generate_replay(model, **kwargs)
    out = str(tmp_path / "resumed")

    class Stop(Exception):
        pass

    def stop_after_shard_0(shard, out_dir):
        raise Stop

    with pytest.raises(Stop):
        sf.generate_replay(model, out_dir=out, on_shard_written=stop_after_shard_0, **kwargs)
    meta = rb.read_metadata(out)  # rewrite it as the v1 code wrote it: v1 shard, v1 metadata
    tensors = rb.read_shard(out, meta["shards"][0], meta)
    del tensors["sampled_logprobs"]
    meta.update(format_version=1, sampled_logprobs=False)
    meta["shards"][0].update(rb.write_shard(out, 0, tensors, metadata=meta))
    rb.write_metadata(out, meta)
    resumed = sf.generate_replay(model, out_dir=out, **kwargs)
    assert rb.read_metadata(out)["format_version"] == 1 and len(resumed) == 10
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        assert set(load_file(os.path.join(out, name))) == set(rb.TENSOR_NAMES)
    for how, load in LOADERS.items():
        loaded = load(out)
        assert_same(ReplayBuffer.concat(list(loaded.shards())) if how == "open" else loaded, straight)
