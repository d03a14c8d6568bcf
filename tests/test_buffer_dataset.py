"""ReplayBuffer.to_dataset / from_dataset (issue #12, item 3): a Hugging Face datasets.Dataset, one unpadded
row per sequence, back to the same buffer exactly, with the checks of ReplayBuffer.open on import."""

import json

import pytest
import torch

from selfreplay_fast.replay_buffer import ReplayBuffer, ReplayBufferError
from test_buffer_format_v2 import with_sampled
from test_replay_buffer import VOCAB, K, assert_same, make_buffer

datasets = pytest.importorskip("datasets")  # the "test" extra installs it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sampled", [False, True])
def test_round_trip_is_exact(tmp_path, dtype, sampled):
    buffer = make_buffer(num_seq=9, seed=2, logprob_dtype=dtype)
    if sampled:
        buffer = with_sampled(buffer)
    ds = buffer.to_dataset()
    assert len(ds) == 9 and [len(r) for r in ds["input_ids"]] == buffer.lengths.tolist()  # unpadded rows
    assert ds[0]["teacher_ids"][0] == buffer.teacher_ids[0, 0].tolist() and len(ds[0]["teacher_ids"][0]) == K
    ds.save_to_disk(str(tmp_path / "ds"))  # Arrow on disk and back
    back = ReplayBuffer.from_dataset(datasets.load_from_disk(str(tmp_path / "ds")), expected_vocab_size=VOCAB)
    assert_same(back, buffer)
    assert back.teacher_logprobs.dtype == dtype and back.mode == buffer.mode
    assert (back.sampled_logprobs is None) == (not sampled)
    if sampled:
        assert torch.equal(back.sampled_logprobs, buffer.sampled_logprobs)
    assert back.metadata["model_name"] == "unit-test"


def test_import_runs_the_checks_of_open():
    buffer = make_buffer(num_seq=6, seed=1)
    ds = buffer.to_dataset()
    with pytest.raises(ReplayBufferError, match="vocabulary of 37 tokens, but expected_vocab_size is 40"):
        ReplayBuffer.from_dataset(ds, expected_vocab_size=40)
    # rows changed after export: the content digest catches it, unless the change is deliberate
    changed = ds.select([0, 2, 4])
    with pytest.raises(ReplayBufferError, match="content_sha256"):
        ReplayBuffer.from_dataset(changed)
    part = ReplayBuffer.from_dataset(changed, verify_checksum=False)
    assert_same(part, buffer.select([0, 2, 4]))
    # a dataset that lost its info, or never had it: metadata must be passed
    bare = datasets.Dataset.from_dict(ds.to_dict())
    with pytest.raises(ReplayBufferError, match="pass metadata="):
        ReplayBuffer.from_dataset(bare)
    meta = json.loads(ds.info.description)
    assert_same(ReplayBuffer.from_dataset(bare, metadata=meta), buffer)
    with pytest.raises(ReplayBufferError, match="'mode'"):
        ReplayBuffer.from_dataset(bare, metadata={**meta, "mode": "other"})
    with pytest.raises(ReplayBufferError, match="incomplete"):
        ReplayBuffer.from_dataset(bare, metadata={**meta, "complete": False})
    # teacher values that validate() refuses: an id outside the vocabulary
    rows = ds.to_dict()
    rows["teacher_ids"][0][0][0] = VOCAB + 5
    bad = datasets.Dataset.from_dict(rows, features=ds.features)
    with pytest.raises(ValueError, match="teacher_ids"):
        ReplayBuffer.from_dataset(bad, metadata=meta, verify_checksum=False)
    rows = ds.to_dict()
    rows["teacher_tail_logprob"][1] = rows["teacher_tail_logprob"][1][:-1]  # one position short
    with pytest.raises(ReplayBufferError, match="one entry per token"):
        ReplayBuffer.from_dataset(datasets.Dataset.from_dict(rows, features=ds.features), metadata=meta)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        ReplayBuffer.from_dataset(rows)
