"""generate_replay(backend="vllm") samples from the model's distribution and records it: exact sampling
(chi-square against enumerated sequence probabilities, also for self-dialogues), the recorded top-k and
tail against the model's own float64 distribution, per-request seeds. The engine is the session fixture
vllm_engine (tests/conftest.py); tests/vllm_cases.py says when these tests run.
"""

from vllm_cases import student_llama, teacher_errors  # noqa: I001  first: the module skips without vLLM

import pytest
import torch
from test_generation import BOS, EOS, TINY_VOCAB, chi_square_pvalue, exact_sequence_probs
from test_self_dialogue import check_dialogue_buffer, check_trains, dialogue_tokenizer, exact_dialogue_probs

from selfreplay_fast import SelfDialogue
from selfreplay_fast.generation import generate_replay
from selfreplay_fast.generation.vllm_backend import tail_from_topk


def test_tail_from_topk_in_float64():
    lp = torch.tensor([[-0.1, -3.0], [0.0, -50.0], [-0.5, -0.5]], dtype=torch.float64)
    expected = torch.log1p(-lp.exp().sum(-1))
    got = tail_from_topk(lp.numpy())
    assert got[0] == pytest.approx(float(expected[0]), rel=1e-12)
    assert got[1] == float("-inf") and got[2] == float("-inf")  # a mass of >= 1 leaves no tail
    assert (tail_from_topk(lp.numpy(), complete=True) == float("-inf")).all()


# ----------------------------------------------------------------------------------------------------
# Sampling follows the model's distribution
# ----------------------------------------------------------------------------------------------------


NUM_SAMPLES = 3000
MAX_NEW = 3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_follows_model_distribution(vllm_engine, temperature):
    path, model, llm = vllm_engine
    buffer = generate_replay(llm, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3, temperature=temperature,
                             seed=1, progress=False, shard_size=NUM_SAMPLES, backend="vllm")
    assert len(buffer) == NUM_SAMPLES and buffer.metadata["generation"]["backend"] == "vllm"
    exact = exact_sequence_probs(model, [BOS], MAX_NEW, temperature)
    assert chi_square_pvalue(buffer, [BOS], exact) > 1e-3
    if temperature != 1.0:  # the same test rejects samples of another temperature: it can fail
        assert chi_square_pvalue(buffer, [BOS], exact_sequence_probs(model, [BOS], MAX_NEW, 1.0)) < 1e-3


def test_different_seeds_differ(vllm_engine):
    path, model, llm = vllm_engine
    a, b = (generate_replay(llm, num_sequences=40, max_new_tokens=6, top_k=3, seed=s, progress=False, backend="vllm")
            for s in (0, 1))
    assert a.sequences() != b.sequences()


# ----------------------------------------------------------------------------------------------------
# The recorded teacher is the model's own distribution
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_recorded_teacher_equals_the_models(vllm_engine, temperature):
    path, model, llm = vllm_engine
    prompts = [[BOS], [BOS, 1, 2, 3], [BOS, 2]]
    buffer = generate_replay(llm, num_sequences=30, max_new_tokens=20, top_k=3, temperature=temperature,
                             logprob_dtype=torch.float32,
                             prompts=prompts, seed=5, shard_size=8, progress=False, backend="vllm")
    prompt_lens = [len(prompts[i % 3]) for i in range(30)]
    for i, seq in enumerate(buffer.sequences()):
        assert seq[: prompt_lens[i]] == prompts[i % 3]
        new = seq[prompt_lens[i]:]
        assert 1 <= len(new) <= 20 and EOS not in new[:-1]  # EOS only ever ends a sequence
        assert len(new) == 20 or new[-1] == EOS
    assert int((buffer.teacher_ids[..., 0] >= 0).sum()) >= 40  # enough teacher rows to test
    buffer.validate()
    worst = teacher_errors(model, buffer, prompt_lens, temperature)
    print(worst)
    # vLLM computes float32 logits with its own kernels and a float32 log_softmax: log-probs agree to ~1e-6
    # (measured 2e-6), so within 2e-5; the tail mass is 1 - sum of k float32 probabilities, absolute error
    # ~1e-7 (measured 1.3e-7), so within 2e-6, and resolved (> 1e-3) log-tails within 1e-3 (measured 1.2e-5).
    assert worst["logprob"] < 2e-5 and worst["tail_mass"] < 2e-6 and worst["log_tail"] < 1e-3
    assert worst["sampled_logprob"] < 2e-5  # the sampled token's log-prob: the same float32 log_softmax
    assert buffer.metadata["sampled_from_teacher"] and buffer.metadata["provenance"]["backend"] == "vllm"
    assert buffer.metadata["provenance"]["vllm"] is not None


def test_full_vocabulary_teacher_has_no_tail(vllm_engine):
    path, model, llm = vllm_engine
    buffer = generate_replay(llm, num_sequences=4, max_new_tokens=6, top_k=TINY_VOCAB, progress=False, backend="vllm",
                             logprob_dtype=torch.float32)
    mask = buffer.teacher_ids[..., 0] >= 0
    assert torch.isneginf(buffer.teacher_tail_logprob[mask]).all()
    assert torch.equal(buffer.teacher_ids[mask].sort(-1).values, torch.arange(TINY_VOCAB, dtype=torch.int32).expand(int(mask.sum()), -1))
    mass = buffer.teacher_logprobs[mask].double().exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Self-dialogues (the checks of tests/test_self_dialogue.py, on the engine's model)
# ----------------------------------------------------------------------------------------------------


def test_self_dialogues_follow_the_dialogue_process(vllm_engine):
    path, model, llm = vllm_engine
    buffer = generate_replay(llm, num_sequences=2000, max_new_tokens=2, top_k=3, seed=1, shard_size=2000,
                             prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=2), progress=False, backend="vllm")
    assert chi_square_pvalue(buffer, [], exact_dialogue_probs(model, max_user=2, max_new=2)) > 1e-3


def test_self_dialogue_structure_teacher_masks_and_training(vllm_engine, tmp_path):
    """The same structure, teacher rows and masks as the native backend's dialogues, and the same settings."""
    path, model, llm = vllm_engine
    out = str(tmp_path / "buf")
    kwargs = dict(num_sequences=40, max_new_tokens=5, top_k=3, temperature=0.7, shard_size=16, seed=3,
                  logprob_dtype=torch.float32, progress=False,
                  prompts=SelfDialogue(dialogue_tokenizer(), max_user_tokens=6))
    buffer = generate_replay(llm, out_dir=out, backend="vllm", **kwargs)
    # vLLM's float32 log_softmax: within 2e-5 of the float64 reference (test_recorded_teacher_equals_the_models)
    ways = check_dialogue_buffer(model, buffer, 6, 5, temperature=0.7, atol=2e-5)
    assert all(count >= 2 for count in ways.values()), ways  # every way a user turn ends is exercised
    buffer.validate()
    assert buffer.generation_stats.generated_tokens == int((buffer.teacher_ids[..., 0] >= 0).sum())
    native = generate_replay(model, **dict(kwargs, num_sequences=4))
    assert buffer.metadata["generation"]["self_dialogue"] == native.metadata["generation"]["self_dialogue"]
    assert buffer.metadata["generation"]["prompts_sha256"] == native.metadata["generation"]["prompts_sha256"]
    check_trains(model, student_llama(), out, temperature=0.7)
    again = generate_replay(llm, backend="vllm", **kwargs)  # per-request seeds, phase 2's apart from phase 1's
    assert again.sequences() == buffer.sequences()
