"""The sequence-level Monte Carlo estimate of KL(original || model) (issue #14, item 1; forgetting.py): on a
model whose sequence distribution can be enumerated (5 tokens, EOS, at most 3 new tokens), the exact KL by
enumeration in float64 against the estimate from sequences the original sampled, within its standard error;
unavailable (not zero) for a buffer that cannot give it."""

import copy
import itertools
import math

import pytest
import torch

import selfreplay_fast as sf

VOCAB, BOS, EOS, MAX_NEW = 5, 1, 2, 3


def enumerable_model(seed, scale):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=16,
                                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model.eval()


@torch.no_grad()
def sequence_log_probs(model, temperature=1.0):
    """log p(x) in float64 (a float64 copy of the model) for every sequence the sampler can emit: BOS, then
    tokens until EOS or MAX_NEW."""
    model = copy.deepcopy(model).double()
    out = {}
    for length in range(1, MAX_NEW + 1):
        for tokens in itertools.product(range(VOCAB), repeat=length):
            if EOS in tokens[:-1] or (length < MAX_NEW and tokens[-1] != EOS):
                continue  # not a complete sequence: EOS ends one early, else the budget does
            seq = [BOS, *tokens]
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double() / temperature, -1)
            out[tuple(tokens)] = float(sum(logp[j, seq[j + 1]] for j in range(length)))
    return out


def exact_kl(original, model, temperature=1.0):
    p, q = sequence_log_probs(original, temperature), sequence_log_probs(model, temperature)
    assert math.isclose(sum(math.exp(v) for v in p.values()), 1.0, rel_tol=1e-9)  # the enumeration is complete
    return sum(math.exp(p[x]) * (p[x] - q[x]) for x in p)


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_the_estimate_is_unbiased(temperature):
    original, model = enumerable_model(0, 6.0), enumerable_model(1, 6.0)
    truth = exact_kl(original, model, temperature)
    replay = sf.generate_replay(original, num_sequences=3000, max_new_tokens=MAX_NEW, top_k=3, batch_size=256,
                                shard_size=500, seed=4, temperature=temperature, progress=False)
    report = sf.measure_forgetting(model, replay, batch_size=500, temperature=temperature, progress=False)
    estimate = report.sequence_kl
    assert report.sequence_kl_unavailable is None and truth > 0.3
    assert estimate.stderr < 0.1 * truth  # the test discriminates: a bias of a tenth of the KL would fail it
    assert abs(estimate.value - truth) < 4 * estimate.stderr, (estimate, truth)
    # its standard error is that of a mean over sequences: recomputed from the per-sequence log-ratios
    p, q = sequence_log_probs(original, temperature), sequence_log_probs(model, temperature)
    ratios = torch.tensor([p[tuple(s[1:])] - q[tuple(s[1:])] for s in replay.sequences()], dtype=torch.float64)
    assert math.isclose(estimate.value, float(ratios.mean()), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(estimate.stderr, float(ratios.std()) / math.sqrt(len(ratios)), rel_tol=1e-3)
    logged = report.as_dict("eval_")
    assert logged["eval_sequence_kl"] == estimate.value and logged["eval_sequence_kl_stderr"] == estimate.stderr


def test_the_original_model_estimates_zero_and_speculative_sampling_agrees():
    original = enumerable_model(0, 6.0)
    replay = sf.generate_replay(original, num_sequences=200, max_new_tokens=MAX_NEW, top_k=2, batch_size=64,
                                seed=1, progress=False, drafter="ngram")
    report = sf.measure_forgetting(original, replay, batch_size=64, progress=False)
    assert abs(report.sequence_kl.value) < 1e-5 and report.sequence_kl.stderr < 1e-5


def test_a_buffer_without_sampled_text_reports_the_estimate_unavailable(tmp_path):
    original, model = enumerable_model(0, 6.0), enumerable_model(1, 6.0)
    corpus = sf.build_teacher_cache(original, [[BOS, 3, 4, EOS], [BOS, 4, EOS]], 2, tmp_path / "c", progress=False)
    report = sf.measure_forgetting(model, corpus, progress=False)
    assert report.sequence_kl is None and "not sampled from the original" in report.sequence_kl_unavailable
    assert "eval_sequence_kl" not in report.as_dict("eval_")
    replay = sf.generate_replay(original, num_sequences=8, max_new_tokens=MAX_NEW, top_k=2, progress=False)
    replay.save(tmp_path / "v1", format_version=1)  # format v1 has no sampled log-probs
    for buffer in (sf.ReplayBuffer.load(tmp_path / "v1"), sf.ReplayBuffer.open(tmp_path / "v1")):
        report = sf.measure_forgetting(model, buffer, progress=False)
        assert report.sequence_kl is None and "sampled tokens' log-probs" in report.sequence_kl_unavailable
    replay.save(tmp_path / "v2")
    lazy = sf.measure_forgetting(model, sf.ReplayBuffer.open(tmp_path / "v2"), progress=False)
    assert lazy.sequence_kl == sf.measure_forgetting(model, replay, progress=False).sequence_kl
