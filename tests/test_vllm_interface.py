"""generate_replay(backend="vllm") writes the native backend's buffer: the same metadata, ReplayBuffer.open and
fused_replay_kl accept it, `selfreplay generate --backend vllm` writes what the library call writes, and bad
input is refused with an error naming the argument. The engine is the session fixture vllm_engine
(tests/conftest.py); tests/vllm_cases.py says when these tests run.
"""

from vllm_cases import ENGINE_ARGS, student_llama  # noqa: I001  first: the module skips without vLLM

import json

import pytest
import torch
from test_generation import BOS, TINY_VOCAB, tiny_llama
from test_self_dialogue import check_trains

from selfreplay_fast.generation import generate_replay, model_config_hash
from selfreplay_fast.replay_buffer import ReplayBuffer


def test_buffer_opens_and_trains_with_fused_replay_kl(vllm_engine, tmp_path):
    path, model, llm = vllm_engine
    out = str(tmp_path / "buf")
    generate_replay(llm, num_sequences=10, max_new_tokens=12, top_k=3, prompts=[[BOS], [BOS, 1, 2]], shard_size=4,
                    out_dir=out, progress=False, keep_in_memory=False, backend="vllm", logprob_dtype=torch.float32)
    meta = ReplayBuffer.load(out, expected_vocab_size=TINY_VOCAB).metadata
    assert meta["config_hash"] == model_config_hash(model)  # the native backend's hash of the same checkpoint
    native = generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=3, progress=False)
    assert set(meta["generation"]) == set(native.metadata["generation"]) | {"backend"}
    # the buffer fed back through its own model: KL 0 (float32 noise); another model: the float64 reference
    assert len(check_trains(model, student_llama(), out)) == 10


def test_generate_command_with_the_vllm_backend(vllm_engine, tmp_path, capsys):
    """The CLI builds its own engine from the directory (build_llm) and writes what the engine fixture's would."""
    from selfreplay_fast import cli

    path, model, llm = vllm_engine
    out = tmp_path / "out"
    common = ["--num-sequences", "6", "--max-new-tokens", "5", "--top-k", "3", "--seed", "3", "--shard-size", "4"]
    assert cli.main(["generate", "--model", path, "--out", str(out), *common, "--backend", "vllm", "--no-progress",
                     "--vllm-engine-args", json.dumps(ENGINE_ARGS)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["buffer"]["sequences"] == 6
    buffer = ReplayBuffer.load(str(out), expected_vocab_size=TINY_VOCAB)
    same = generate_replay(llm, num_sequences=6, max_new_tokens=5, top_k=3, seed=3, shard_size=4, progress=False,
                           backend="vllm")
    assert buffer.sequences() == same.sequences()  # same seeds, same engine settings: the same sequences
    assert buffer.metadata["generation"]["backend"] == "vllm"
    assert cli.main(["generate", "--model", path, "--out", str(tmp_path / "o2"), *common, "--backend", "vllm",
                     "--ngram-draft"]) == cli.EXIT_USAGE_ERROR
    assert "--ngram-draft: not supported with --backend vllm" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(drafter="ngram"), "drafter is not supported by backend='vllm'"),
    (dict(sampled_draws=8), "sampled_draws is not supported"),
    (dict(check_every=2), "check_every is not supported"),
    (dict(backend="sglang"), "backend must be one of"),
    (dict(top_k=6), "exceeds the model's vocabulary size 5"),
    (dict(vllm_engine_args={"dtype": "float32"}), "vllm_engine_args only applies when model is a path"),
])
def test_bad_arguments_are_refused(vllm_engine, kwargs, match):
    path, model, llm = vllm_engine
    args = dict(num_sequences=2, max_new_tokens=2, top_k=3, progress=False, backend="vllm")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate_replay(llm, **args)


def test_engine_settings_that_change_the_meaning_are_refused(vllm_engine, monkeypatch):
    path, model, llm = vllm_engine
    monkeypatch.setattr(llm.model_config, "logprobs_mode", "raw_logprobs")
    with pytest.raises(ValueError, match="logprobs_mode='processed_logprobs'"):
        generate_replay(llm, num_sequences=2, max_new_tokens=2, top_k=3, temperature=0.7, progress=False, backend="vllm")
    monkeypatch.setattr(llm.model_config, "logprobs_mode", "processed_logprobs")
    monkeypatch.setattr(llm.model_config, "max_logprobs", 2)
    with pytest.raises(ValueError, match="max_logprobs=3 or more"):
        generate_replay(llm, num_sequences=2, max_new_tokens=2, top_k=3, progress=False, backend="vllm")


def test_model_must_be_a_directory_or_an_engine(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        generate_replay(str(tmp_path / "missing"), num_sequences=2, max_new_tokens=2, progress=False, backend="vllm")
    with pytest.raises(TypeError, match="local model directory or a vllm.LLM"):
        generate_replay(tiny_llama(0), num_sequences=2, max_new_tokens=2, progress=False, backend="vllm")
    with pytest.raises(ValueError, match="vllm_engine_args only applies to backend='vllm'"):
        generate_replay(tiny_llama(0), num_sequences=2, max_new_tokens=2, progress=False, vllm_engine_args={})
