"""Data-parallel build_teacher_cache (issue 12): N processes fill one out_dir, rank r computing shards r,
r + N, ... (generation/shard_schedule.py), and the cache equals a single-process run's byte for byte:
shard files, checksums and metadata. Ranks from rank= / world_size=, from RANK / WORLD_SIZE, and from
`selfreplay cache --rank/--world-size`; bad ranks are refused naming the argument.

The model and corpus are tests/test_teacher_cache.py's; ranks that must run at the same time are real
subprocesses (one thread each, as the reference run here: tests/test_generation.py's one_thread).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from test_generation import one_thread  # noqa: F401  (autouse: one thread, as in the ranks)
from test_teacher_cache import VOCAB, corpus, tiny_model

import selfreplay_fast as sf
from selfreplay_fast import cli
from selfreplay_fast.generation import parallel_writer
from selfreplay_fast.replay_buffer import read_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, SHARD_SIZE, COUNT = 3, 2, 9  # 5 shards, the last short
TENSORS = ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob", "sampled_logprobs")

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from test_teacher_cache import corpus, tiny_model
    from selfreplay_fast import build_teacher_cache

    out_dir, rank, world_size, k, shard_size, count = sys.argv[1], *map(int, sys.argv[2:])
    assert build_teacher_cache(tiny_model(), corpus(count=count), k, out_dir, batch_size=3, shard_size=shard_size,
                               progress=False, rank=rank, world_size=world_size) is None
    """
)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: the same cache from one process."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("single") / "cache"
    sf.build_teacher_cache(tiny_model(), corpus(count=COUNT), K, out, batch_size=3, shard_size=SHARD_SIZE,
                           progress=False)
    return out


def assert_equals_single(out_dir, single_dir):
    """The same files, byte for byte (shards, so checksums, and metadata.json), and the same tensors."""
    names = sorted(p.name for p in single_dir.iterdir())
    assert names == ["metadata.json"] + [f"shard-{i:05d}.safetensors" for i in range(5)]
    assert sorted(p.name for p in out_dir.iterdir()) == names  # no lock, claim or temporary file left over
    for name in names[1:]:
        assert (out_dir / name).read_bytes() == (single_dir / name).read_bytes(), name
    meta = read_metadata(str(out_dir))
    assert meta["complete"] is True and parallel_writer.OUT_OF_ORDER_FIELD not in meta
    assert meta == read_metadata(str(single_dir))
    a, b = (sf.ReplayBuffer.load(d, expected_vocab_size=VOCAB) for d in (out_dir, single_dir))
    for name in TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_two_ranks_at_once_equal_one_process(tmp_path, single):
    script = tmp_path / "rank.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    out = tmp_path / "dp"
    procs = [subprocess.Popen([sys.executable, str(script), str(out), str(rank), "2", str(K), str(SHARD_SIZE), str(COUNT)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert_equals_single(out, single)


def test_ranks_one_after_the_other_from_the_environment(tmp_path, single, monkeypatch):
    """Ranks need not overlap: rank 1 alone leaves its shards out of order (nothing listed before shard 0),
    rank 0 (RANK/WORLD_SIZE, as torchrun sets them) completes the buffer."""
    out = tmp_path / "dp"
    model, seqs = tiny_model(), corpus(count=COUNT)
    computed = []
    original = sf.teacher_cache._teacher_rows
    monkeypatch.setattr(sf.teacher_cache, "_teacher_rows", lambda *a: computed.append(a[3][0].tolist()) or original(*a))
    assert sf.build_teacher_cache(model, seqs, K, out, batch_size=3, shard_size=SHARD_SIZE, progress=False,
                                  rank=1, world_size=2) is None
    assert computed == [seqs[2], seqs[6]]  # shards 1 and 3: each shard's first sequence
    meta = read_metadata(str(out))
    assert meta["shards"] == [] and meta["complete"] is False
    assert [e["file"] for e in meta[parallel_writer.OUT_OF_ORDER_FIELD]] == ["shard-00001.safetensors",
                                                                            "shard-00003.safetensors"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert sf.build_teacher_cache(model, seqs, K, out, batch_size=3, shard_size=SHARD_SIZE, progress=False) is None
    assert computed[2:] == [seqs[0], seqs[4], seqs[8]]  # shards 0, 2 and 4
    assert_equals_single(out, single)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")  # one process again: the complete buffer resumes to itself, nothing computed
    assert len(sf.build_teacher_cache(model, seqs, K, out, batch_size=3, shard_size=SHARD_SIZE, progress=False)) == COUNT
    assert len(computed) == 5


def test_cache_command_ranks_equal_one_process(tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in corpus(count=COUNT)))
    common = ["cache", "--model", str(model_dir), "--data", str(data), "--top-k", str(K), "--batch-size", "3",
              "--shard-size", str(SHARD_SIZE), "--no-progress"]
    assert cli.main([*common, "--out", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    for rank in (1, 0):
        assert cli.main([*common, "--out", str(tmp_path / "dp"), "--rank", str(rank), "--world-size", "2"]) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        # this rank's shards: rank 1 has sequences 2, 3, 6, 7; rank 0 the other five
        assert summary["this_run"]["sequences"] == (4 if rank else 5)
        assert summary["buffer"]["complete"] is (rank == 0)
    assert_equals_single(tmp_path / "dp", tmp_path / "single")
    assert cli.main([*common, "--out", str(tmp_path / "bad"), "--rank", "2", "--world-size", "2"]) == cli.EXIT_USAGE_ERROR
    assert "argument --rank: rank must be in [0, world_size) = [0, 2), got 2" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=2, world_size=2), r"rank must be in \[0, world_size\) = \[0, 2\), got 2"),
    (dict(world_size=0), "world_size must be an int >= 1"),
    (dict(world_size=2), "rank must be given with world_size=2"),
])
def test_bad_ranks_are_refused(tmp_path, kwargs, match, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=match):
        sf.build_teacher_cache(tiny_model(), corpus(), K, tmp_path / "c", progress=False, **kwargs)
    assert not (tmp_path / "c").exists()  # refused before anything was written
