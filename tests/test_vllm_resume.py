"""Resume and data-parallel generation with backend="vllm": an interrupted run and one killed with SIGKILL
resume to the uninterrupted run's shards byte for byte, and two processes filling one out_dir equal one
process. The engine is the session fixture vllm_engine (tests/conftest.py); the child processes run
tests/vllm_resume_script.py; tests/vllm_cases.py says when these tests run.
"""

from vllm_cases import resume_script_command, run_resume_script, script_env  # noqa: I001  first: skips without vLLM

import json
import os
import signal
import subprocess

import pytest
import torch
from test_generation import TINY_VOCAB

from selfreplay_fast.generation import generate_replay
from selfreplay_fast.replay_buffer import ReplayBuffer


def test_resume_equals_uninterrupted_run(vllm_engine, tmp_path):
    path, model, llm = vllm_engine
    kwargs = dict(num_sequences=14, max_new_tokens=9, top_k=3, shard_size=4, seed=7, progress=False, backend="vllm")
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    generate_replay(llm, out_dir=straight, **kwargs)

    class Interrupt(Exception):
        pass

    def stop_after_shard_1(shard, out_dir):
        if shard == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate_replay(llm, out_dir=resumed, on_shard_written=stop_after_shard_1, **kwargs)
    partial = ReplayBuffer.load(resumed, allow_incomplete=True)
    assert len(partial) == 8
    shard0 = (tmp_path / "resumed" / "shard-00000.safetensors").read_bytes()
    calls = []
    a = generate_replay(llm, out_dir=resumed, on_shard_written=lambda shard, d: calls.append(shard), **kwargs)
    assert calls == [2, 3]  # shards 0 and 1 were not regenerated
    assert (tmp_path / "resumed" / "shard-00000.safetensors").read_bytes() == shard0
    b = ReplayBuffer.load(straight)
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name  # per-request seeds: the same shards
    for shard in range(4):
        name = f"shard-{shard:05d}.safetensors"
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()
    with pytest.raises(ValueError, match="other settings"):  # a native run cannot resume a vLLM buffer
        generate_replay(model, out_dir=resumed, **{k: v for k, v in kwargs.items() if k != "backend"})


def test_resume_after_kill_9(vllm_engine, tmp_path):
    path, model, llm = vllm_engine
    out = str(tmp_path / "killed")
    killed = run_resume_script(path, out, kill_after=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with open(os.path.join(out, "metadata.json")) as handle:
        meta = json.load(handle)
    assert [s["file"] for s in meta["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert meta["complete"] is False
    finished = run_resume_script(path, out, kill_after=-1)
    assert finished.returncode == 0, finished.stderr[-2000:]
    straight = str(tmp_path / "straight")  # the same run, uninterrupted, on the session's engine
    generate_replay(llm, num_sequences=10, max_new_tokens=6, top_k=3, shard_size=3, seed=11, out_dir=straight,
                    progress=False, keep_in_memory=False, backend="vllm")
    for shard in range(4):
        name = f"shard-{shard:05d}.safetensors"
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert len(ReplayBuffer.open(out, expected_vocab_size=TINY_VOCAB)) == 10


def test_two_ranks_equal_one_process(vllm_engine, tmp_path):
    """Data parallel (issue 12, item 2): two processes, each with its own engine, fill one out_dir at once
    (shard i is rank i % 2's); the buffer equals the session engine's single-process run shard for shard."""
    path, model, llm = vllm_engine
    out = str(tmp_path / "dp")
    ranks = [subprocess.Popen(resume_script_command(path, out, -1, rank, 2), env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    errors = [proc.communicate(timeout=600)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    straight = str(tmp_path / "straight")
    generate_replay(llm, num_sequences=10, max_new_tokens=6, top_k=3, shard_size=3, seed=11, out_dir=straight,
                    progress=False, keep_in_memory=False, backend="vllm")
    assert sorted(os.listdir(out)) == sorted(os.listdir(straight))  # no lock or claim file left over
    for shard in range(4):
        name = f"shard-{shard:05d}.safetensors"
        assert (tmp_path / "dp" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    a, b = ReplayBuffer.open(out, expected_vocab_size=TINY_VOCAB), ReplayBuffer.open(straight)
    assert [e["sha256"] for e in a._entries] == [e["sha256"] for e in b._entries]
    assert ReplayBuffer.load(out).sequences() == ReplayBuffer.load(straight).sequences()
