"""Tests of generate_replay: exact sampling (chi-square against enumerated sequence probabilities),
the cached teacher against a separate full forward pass, speculative decoding, resume and bad input.

Every model is a tiny random Hugging Face model built from a config; no hub access is needed.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import selfreplay_fast.generation.decode_loop as decode_engine
import selfreplay_fast.generation.drafting as drafting
import selfreplay_fast.generation.slot_cache as slot_cache
import selfreplay_fast.generation.slot_cache_compacting as slot_cache_compacting
from selfreplay_fast.generation import DecodeState, NGramDrafter, generate_replay, sample_categorical
from selfreplay_fast.reference import reference_replay_kl
from selfreplay_fast.replay_buffer import ReplayBuffer

@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: intra-op threads only add spin-wait overhead, badly so on a shared 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS, TINY_VOCAB = 0, 4, 5


def tiny_llama(seed, vocab=TINY_VOCAB, layers=2, hidden=16, logit_scale=None, max_positions=32):
    """A tiny Llama. ``logit_scale`` multiplies the lm_head so the next-token distributions are far
    from uniform (random init alone gives near-uniform rows, on which a wrong sampler would pass)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS,
    )
    model = LlamaForCausalLM(config).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    return model


@pytest.fixture(scope="module")
def peaky_model():
    model = tiny_llama(0, logit_scale=12.0)
    # generation_config defaults must not leak into our sampler (HF generate would apply top_k=50 etc.)
    model.generation_config.top_k = 1
    model.generation_config.do_sample = False
    return model


@pytest.fixture(scope="module")
def peaky_draft():
    return tiny_llama(1, layers=1, logit_scale=12.0)


# ----------------------------------------------------------------------------------------------------
# Exact sequence probabilities by enumeration
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def exact_sequence_probs(model, prompt, max_new_tokens, temperature):
    """{generated tokens: probability} for every possible continuation (ends at EOS or the budget),
    computed from plain full forward passes over each prefix."""
    probs = {}

    def expand(prefix, prob):
        logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1].double()
        p = torch.softmax(logits / temperature, -1).tolist()
        for token, pt in enumerate(p):
            seq = prefix + (token,)
            if token == EOS or len(seq) == max_new_tokens:
                probs[seq] = probs.get(seq, 0.0) + prob * pt
            else:
                expand(seq, prob * pt)

    expand((), 1.0)
    assert abs(sum(probs.values()) - 1) < 1e-9
    return probs


def chi_square_pvalue(buffer, prompt, exact):
    counts = {}
    for seq in buffer.sequences():
        assert seq[: len(prompt)] == prompt
        key = tuple(seq[len(prompt):])
        assert key in exact, f"impossible sequence {key}"
        counts[key] = counts.get(key, 0) + 1
    n = len(buffer)
    observed, expected = [], []
    pooled_obs = pooled_exp = 0.0
    for key, p in exact.items():
        # Pool the rare outcomes so every chi-square cell expects >= 5 draws.
        if p * n >= 5:
            observed.append(counts.get(key, 0))
            expected.append(p * n)
        else:
            pooled_obs += counts.get(key, 0)
            pooled_exp += p * n
    observed.append(pooled_obs)
    expected.append(pooled_exp)
    assert len(observed) >= 10, "the test distribution is too concentrated to be informative"
    pvalue = scipy_stats.chisquare(observed, expected).pvalue
    print(f"chi-square p-value {pvalue:.3g} over {len(observed)} cells")
    return pvalue


NUM_SAMPLES = 3000
MAX_NEW = 3


def test_exact_distribution_is_not_trivial(peaky_model):
    exact = exact_sequence_probs(peaky_model, [BOS], MAX_NEW, 1.0)
    assert len(exact) == 1 + 4 + 4 * 4 * 5
    # peaked enough that a wrong temperature is detectable, spread enough for many chi-square cells
    assert 0.05 < max(exact.values()) < 0.5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plain_sampling_follows_model_distribution(peaky_model, temperature):
    buffer = generate_replay(peaky_model, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3,
                             batch_size=256, temperature=temperature, seed=1, progress=False)
    exact = exact_sequence_probs(peaky_model, [BOS], MAX_NEW, temperature)
    assert chi_square_pvalue(buffer, [BOS], exact) > 1e-3


def test_wrong_temperature_sampler_fails_the_test(peaky_model):
    # Sampling at 1.4 but testing against temperature 1: the chi-square test must reject it.
    buffer = generate_replay(peaky_model, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3,
                             batch_size=256, temperature=1.4, seed=1, progress=False)
    exact = exact_sequence_probs(peaky_model, [BOS], MAX_NEW, 1.0)
    assert chi_square_pvalue(buffer, [BOS], exact) < 1e-3


def test_speculative_sampling_follows_model_distribution(peaky_model, peaky_draft):
    buffer = generate_replay(peaky_model, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3,
                             batch_size=256, draft_model=peaky_draft, num_draft_tokens=2, seed=2, progress=False)
    rate = buffer.generation_stats.acceptance_rate
    assert 0.05 < rate < 0.95  # the draft really differs from the target, so rejections are exercised
    exact = exact_sequence_probs(peaky_model, [BOS], MAX_NEW, 1.0)
    assert chi_square_pvalue(buffer, [BOS], exact) > 1e-3


def test_speculative_without_residual_fails_the_test(peaky_model, peaky_draft, monkeypatch):
    # The classic bug: after a rejection, resample from p instead of normalize(max(p - q, 0)).
    monkeypatch.setattr(decode_engine, "correction_distribution", lambda p, q, rejected: p)
    buffer = generate_replay(peaky_model, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3,
                             batch_size=256, draft_model=peaky_draft, num_draft_tokens=2, seed=2, progress=False)
    exact = exact_sequence_probs(peaky_model, [BOS], MAX_NEW, 1.0)
    assert chi_square_pvalue(buffer, [BOS], exact) < 1e-3


def test_ngram_speculative_sampling_follows_model_distribution(peaky_model):
    # A repetitive prompt so the n-gram drafter finds matches and proposes real continuations.
    prompt = [BOS, 1, 2, 3, 1, 2]
    buffer = generate_replay(peaky_model, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3,
                             batch_size=256, prompts=[prompt], drafter=NGramDrafter(max_ngram=2),
                             num_draft_tokens=2, seed=3, progress=False)
    assert buffer.generation_stats.acceptance_rate > 0.05
    exact = exact_sequence_probs(peaky_model, prompt, MAX_NEW, 1.0)
    assert chi_square_pvalue(buffer, prompt, exact) > 1e-3


def test_ngram_without_residual_fails_the_test(peaky_model, monkeypatch):
    monkeypatch.setattr(decode_engine, "correction_distribution", lambda p, q, rejected: p)
    prompt = [BOS, 1, 2, 3, 1, 2]
    buffer = generate_replay(peaky_model, num_sequences=NUM_SAMPLES, max_new_tokens=MAX_NEW, top_k=3,
                             batch_size=256, prompts=[prompt], drafter=NGramDrafter(max_ngram=2),
                             num_draft_tokens=2, seed=3, progress=False)
    exact = exact_sequence_probs(peaky_model, prompt, MAX_NEW, 1.0)
    assert chi_square_pvalue(buffer, prompt, exact) < 1e-3


# ----------------------------------------------------------------------------------------------------
# The cached teacher equals a separate full forward pass
# ----------------------------------------------------------------------------------------------------


def build_model(arch, seed, vocab=48, layers=2):
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2)
        model = Qwen2ForCausalLM(config)
    else:
        # n_positions = the longest sequence exactly, so draft positions past it must be clamped
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=17,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # peakier rows: EOS hits and n-gram repeats happen
    return model.eval()


@torch.no_grad()
def assert_teacher_matches_full_forward(model, buffer, k, prompts_len=None, temperature=1.0):
    assert buffer.teacher_ids.dtype == torch.int32
    for i, seq in enumerate(buffer.sequences()):
        n = len(seq)
        logits = model(torch.tensor([seq])).logits[0].double() / temperature
        logp = torch.log_softmax(logits, -1)
        has_teacher = buffer.teacher_ids[i, :n, 0] >= 0
        prompt_len = prompts_len[i] if prompts_len is not None else 1
        # rows prompt_len-1 .. n-2 predict the sampled tokens; the prompt rows before and the last row do not
        expected_rows = torch.zeros(n, dtype=torch.bool)
        expected_rows[prompt_len - 1 : n - 1] = True
        assert torch.equal(has_teacher, expected_rows), (i, has_teacher, expected_rows)
        assert (buffer.teacher_ids[i, n:] == -1).all()
        rows = torch.nonzero(expected_rows)[:, 0]
        top = logp[rows].topk(k, dim=-1)
        cached_ids = buffer.teacher_ids[i, rows].long()
        cached_lp = buffer.teacher_logprobs[i, rows].double()
        # ids must agree except where two log-probs tie within float32 noise
        recomputed_at_cached = logp[rows].gather(1, cached_ids)
        torch.testing.assert_close(recomputed_at_cached, top.values, atol=2e-5, rtol=0)
        torch.testing.assert_close(cached_lp, top.values, atol=2e-5, rtol=0)
        tail = logp[rows].scatter(1, cached_ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(buffer.teacher_tail_logprob[i, rows].double(), tail, atol=2e-5, rtol=1e-5)
        # every sampled token must have had positive probability under the recorded distribution
        assert torch.isfinite(logp[rows, torch.tensor(seq)[rows + 1]]).all()
        # the sampled token's log-prob (cache v2) is the target's at every emitted position, 0 elsewhere
        torch.testing.assert_close(buffer.sampled_logprobs[i, rows].double(), logp[rows, torch.tensor(seq)[rows + 1]],
                                   atol=2e-5, rtol=1e-6)
        assert (buffer.sampled_logprobs[i, :n][~expected_rows] == 0).all() and (buffer.sampled_logprobs[i, n:] == 0).all()


def use_compacting_cache(monkeypatch):
    """Run generation on the compacting DynamicCache (flash-attn's slot cache) under SDPA, compacting
    as often as it can (slack 0)."""
    monkeypatch.setattr(slot_cache_compacting, "COMPACT_SLACK", 0)
    for module in (slot_cache, drafting):  # the target's (through SlotModelPool) and the draft model's
        monkeypatch.setattr(module, "make_slot_model", slot_cache_compacting.CompactingSlotModel)


@pytest.mark.parametrize("speculative", ["none", "draft", "ngram"])
@pytest.mark.parametrize("arch,cache", [("llama", "static"), ("qwen2", "static"), ("gpt2", "static"),
                                        ("llama", "compacting")])
def test_cached_topk_equals_full_forward(arch, speculative, cache, monkeypatch):
    # Both slot caches (the compacting one on one architecture), and the delayed finish checks (check_every=3).
    if cache == "compacting":
        use_compacting_cache(monkeypatch)
    model = build_model(arch, 0)
    prompts = [[1, 5, 6, 5, 6], [1], [1, 7, 7]]
    kwargs = {}
    if speculative == "draft":
        kwargs["draft_model"] = build_model(arch, 1, layers=1)
    elif speculative == "ngram":
        kwargs["drafter"] = NGramDrafter()
    k = 6
    buffer = generate_replay(model, num_sequences=14, max_new_tokens=12, top_k=k, batch_size=4, prompts=prompts,
                             shard_size=8, seed=5, progress=False, check_every=3, num_draft_tokens=3,
                             logprob_dtype=torch.float32, **kwargs)
    assert len(buffer) == 14
    assert buffer.k == k and buffer.vocab_size == 48
    prompt_lens = [len(prompts[i % 3]) for i in range(14)]
    for i, seq in enumerate(buffer.sequences()):
        assert seq[: prompt_lens[i]] == prompts[i % 3]
        new = seq[prompt_lens[i]:]
        assert 1 <= len(new) <= 12
        assert 2 not in new[:-1]  # EOS only ever ends a sequence
        assert len(new) == 12 or new[-1] == 2
    buffer.validate()
    assert_teacher_matches_full_forward(model, buffer, k, prompt_lens)
    if speculative != "none":
        assert buffer.generation_stats.acceptance_rate is not None


def test_teacher_at_temperature_and_float16(monkeypatch):
    model = build_model("llama", 3)
    buffer = generate_replay(model, num_sequences=6, max_new_tokens=8, top_k=5, batch_size=3, temperature=0.6,
                             seed=0, progress=False)
    assert buffer.teacher_logprobs.dtype == torch.float16  # the default (cache format v2)
    exact = generate_replay(model, num_sequences=6, max_new_tokens=8, top_k=5, batch_size=3, temperature=0.6,
                            seed=0, progress=False, logprob_dtype=torch.float32)
    assert torch.equal(buffer.sampled_logprobs, exact.sampled_logprobs)  # always float32
    assert torch.equal(buffer.input_ids, exact.input_ids)
    torch.testing.assert_close(buffer.teacher_logprobs.float(), exact.teacher_logprobs, atol=1e-2, rtol=1e-3)
    assert_teacher_matches_full_forward(model, exact, 5, temperature=0.6)


def test_full_vocab_teacher_has_no_tail_and_sums_to_one():
    model = build_model("qwen2", 4)
    buffer = generate_replay(model, num_sequences=4, max_new_tokens=6, top_k=48, batch_size=4, progress=False,
                             logprob_dtype=torch.float32)
    mask = buffer.teacher_ids[..., 0] >= 0
    assert torch.isneginf(buffer.teacher_tail_logprob[mask]).all()
    mass = buffer.teacher_logprobs[mask].double().exp().sum(-1)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


@torch.no_grad()
def test_batches_align_with_hidden_states_kl_to_self_is_zero():
    """End to end: a buffer from the model, fed back through the same model, gives KL 0 in tail mode,
    and a different model gives KL > 0. This pins down the row-j-predicts-token-j+1 alignment."""
    model = build_model("llama", 6)
    buffer = generate_replay(model, num_sequences=10, max_new_tokens=10, top_k=4, batch_size=4, progress=False,
                             prompts=[[1], [1, 9, 10]], logprob_dtype=torch.float32)
    other = build_model("llama", 7)
    for batch in buffer.batches(4, shuffle=True, seed=0):
        for student, expect_zero in ((model, True), (other, False)):
            hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            kl = reference_replay_kl(hidden.double(), student.lm_head.weight.double(), batch["teacher_ids"],
                                     batch["teacher_logprobs"], mask=batch["mask"],
                                     teacher_tail_logprob=batch["teacher_tail_logprob"], reduction="none")
            assert (kl[~batch["mask"]] == 0).all()
            if expect_zero:
                assert kl.abs().max() < 1e-5
            else:
                assert kl[batch["mask"]].min() > 1e-4


@pytest.mark.parametrize("drafter", [None, "ngram"])
def test_sampled_teacher_mode(drafter):
    model = build_model("llama", 8)
    draws = 400
    buffer = generate_replay(model, num_sequences=4, max_new_tokens=5, top_k=48, batch_size=4, progress=False,
                             sampled_draws=draws, seed=3, drafter=drafter, logprob_dtype=torch.float32)
    assert buffer.mode == "sampled" and buffer.k == 48
    buffer.validate()
    mask = buffer.teacher_ids[..., 0] >= 0
    freqs = torch.where(buffer.teacher_ids >= 0, buffer.teacher_logprobs.double().exp(), 0.0)
    torch.testing.assert_close(freqs[mask].sum(-1), torch.ones(int(mask.sum()), dtype=torch.float64))
    counts = freqs * draws
    torch.testing.assert_close(counts, counts.round(), atol=1e-3, rtol=0)  # frequencies are counts / N
    # frequencies estimate the model's probabilities (binomial standard error <= 0.025 at N = 400)
    with torch.no_grad():
        for i, seq in enumerate(buffer.sequences()):
            probs = torch.softmax(model(torch.tensor([seq])).logits[0].double(), -1)
            for j in torch.nonzero(mask[i])[:, 0].tolist():
                dense = torch.zeros(48, dtype=torch.float64)
                ids = buffer.teacher_ids[i, j]
                dense[ids[ids >= 0].long()] = freqs[i, j][ids >= 0]
                assert (dense - probs[j]).abs().max() < 0.11


def test_self_draft_accepts_everything():
    model = build_model("llama", 9)
    buffer = generate_replay(model, num_sequences=8, max_new_tokens=10, top_k=4, batch_size=4, progress=False,
                             draft_model=model, num_draft_tokens=3, eos_token_id=[])
    # p == q up to float rounding of a different block shape: every draft is accepted
    assert buffer.generation_stats.acceptance_rate > 0.99
    assert (buffer.lengths == 11).all()


@pytest.mark.parametrize("speculative", [False, True])
def test_last_sequences_are_not_checked_every_step(speculative):
    """Once no sequence waits for a slot, finished ones are looked for every check_every steps and at the
    host-known step by which all have surely ended, not at every step (each look is a host sync)."""
    model = build_model("llama", 10)
    kw = dict(num_sequences=4, max_new_tokens=12, top_k=4, batch_size=4, seed=3, progress=False, eos_token_id=[])
    if speculative:
        kw.update(draft_model=build_model("llama", 11), num_draft_tokens=3)
    every = generate_replay(model, check_every=1, **kw)
    sparse = generate_replay(model, check_every=5, **kw)
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        assert torch.equal(getattr(every, name), getattr(sparse, name)), name
    assert (sparse.lengths == 13).all()
    stats = sparse.generation_stats
    assert every.generation_stats.host_checks == every.generation_stats.target_forwards
    if speculative:  # every 5 steps, or at step 12 (all 4 sequences started at step 0)
        assert stats.host_checks == len([s for s in range(1, stats.target_forwards + 1) if s % 5 == 0 or s >= 12])
    else:  # steps 5, 10 and 12: one token per step, the last at step 12
        assert stats.host_checks == 3 and stats.target_forwards == 12


def test_same_seed_same_output_different_seed_differs():
    model = build_model("llama", 10)
    a = generate_replay(model, num_sequences=6, max_new_tokens=8, top_k=4, batch_size=3, seed=11, progress=False)
    b = generate_replay(model, num_sequences=6, max_new_tokens=8, top_k=4, batch_size=3, seed=11, progress=False)
    c = generate_replay(model, num_sequences=6, max_new_tokens=8, top_k=4, batch_size=3, seed=12, progress=False)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.teacher_logprobs, b.teacher_logprobs)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_sample_categorical_matches_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(700, generator=g, dtype=torch.float64) * 2, 0)
    probs[[3, 300, 699]] = 0.0  # zero-probability ids, one at the end of a padded block
    draws = sample_categorical(probs.float()[None], g, 200_000)[0]
    counts = torch.bincount(draws, minlength=700).double()
    assert counts[[3, 300, 699]].sum() == 0
    expected = probs / probs.sum() * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expect = torch.cat([expected[big], expected[~big].sum()[None]])
    assert scipy_stats.chisquare(observed.numpy(), (expect / expect.sum() * observed.sum()).numpy()).pvalue > 1e-3


def test_sample_categorical_scratch_gives_the_same_draws():
    # The decode loop's reusable CDF storage must not change a draw, whatever the buffer held before
    # and whatever shapes it served earlier (a larger one first: the view of its storage is reused).
    from selfreplay_fast.generation.sampling import SamplerScratch

    scratch = SamplerScratch()
    scratch.take((9, 300), "cpu").fill_(float("nan"))
    for rows, vocab in [(5, 258), (3, 17), (7, 1024)]:
        probs = torch.softmax(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 3, -1)
        plain = sample_categorical(probs, torch.Generator().manual_seed(1), 4)
        reused = sample_categorical(probs, torch.Generator().manual_seed(1), 4, scratch=scratch)
        assert torch.equal(plain, reused) and plain.shape == (rows, 4)
        assert probs.gather(1, reused).min() > 0


# ----------------------------------------------------------------------------------------------------
# Resume after a kill
# ----------------------------------------------------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM
    from selfreplay_fast.generation import generate_replay

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)

    def kill_after_shard_1(shard, out_dir):
        if shard == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # abrupt death: no cleanup, no finally blocks

    def run(out_dir, kill):
        return generate_replay(model, num_sequences=14, max_new_tokens=9, top_k=5, batch_size=3, shard_size=4,
                               seed=7, out_dir=out_dir, progress=False, draft_model=None,
                               on_shard_written=kill_after_shard_1 if kill else None)

    for step in sys.argv[1:]:
        action, out_dir = step.split("=", 1)
        run(out_dir, kill=(action == "kill"))
    """
)


def run_resume_script(tmp_path, *steps):
    script = tmp_path / "resume_script.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script), *steps], env=env, capture_output=True, text=True, timeout=300)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    resumed, straight = str(tmp_path / "resumed"), str(tmp_path / "straight")
    killed = run_resume_script(tmp_path, f"kill={resumed}")
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    with open(os.path.join(resumed, "metadata.json")) as handle:
        meta = json.load(handle)
    assert [s["file"] for s in meta["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert meta["complete"] is False
    with pytest.raises(ValueError, match="incomplete"):
        ReplayBuffer.load(resumed)
    partial = ReplayBuffer.load(resumed, allow_incomplete=True)
    assert len(partial) == 8
    # a stray temp file from a write that was killed midway must not confuse the resume
    (tmp_path / "resumed" / ".shard-00002.safetensors.abc.tmp").write_bytes(b"half a shard")

    finished = run_resume_script(tmp_path, f"resume={resumed}", f"run={straight}")
    assert finished.returncode == 0, finished.stderr
    a, b = ReplayBuffer.load(resumed), ReplayBuffer.load(straight)
    assert len(a) == len(b) == 14
    for name in ("input_ids", "lengths", "teacher_ids", "teacher_logprobs", "teacher_tail_logprob"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.sequences()[:8] == partial.sequences()  # the shards written before the kill were kept
    # shards 0 and 1 were not regenerated: their files are byte-identical to the uninterrupted run's
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00003.safetensors"):
        assert (tmp_path / "resumed" / shard).read_bytes() == (tmp_path / "straight" / shard).read_bytes()


def test_rerun_of_a_complete_buffer_returns_it(tmp_path):
    model = build_model("llama", 12)
    kwargs = dict(num_sequences=5, max_new_tokens=6, top_k=4, batch_size=2, shard_size=2, progress=False,
                  out_dir=str(tmp_path / "buf"))
    first = generate_replay(model, **kwargs)
    calls = []
    again = generate_replay(model, on_shard_written=lambda shard, d: calls.append(shard), **kwargs)
    assert calls == []  # nothing regenerated
    assert torch.equal(first.input_ids, again.input_ids)
    assert torch.equal(ReplayBuffer.load(str(tmp_path / "buf"), expected_vocab_size=48).teacher_ids, first.teacher_ids)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_no_bos_and_no_prompts_is_refused():
    model = build_model("llama", 0)
    model.config.bos_token_id = None
    model.generation_config.bos_token_id = None
    with pytest.raises(ValueError, match="no BOS token"):
        generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=2, progress=False)
    # prompts make BOS unnecessary
    buffer = generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=2, progress=False, prompts=[[5, 6]])
    assert buffer.sequences()[0][:2] == [5, 6]


def test_draft_with_another_vocabulary_is_refused():
    model = build_model("llama", 0)
    draft = build_model("llama", 1, vocab=50)
    with pytest.raises(ValueError, match="draft_model has a vocabulary of 50 tokens but model has 48"):
        generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=2, draft_model=draft, progress=False)


def test_top_k_larger_than_vocabulary_is_refused():
    model = build_model("llama", 0)
    with pytest.raises(ValueError, match="top_k = 49 exceeds the model's vocabulary size 48"):
        generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=49, progress=False)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        generate_replay(build_model("llama", 0), num_sequences=2, max_new_tokens=3, top_k=2,
                        temperature=temperature, progress=False)


def test_out_dir_with_a_foreign_buffer_is_refused(tmp_path):
    out = str(tmp_path / "buf")
    generate_replay(build_model("llama", 0), num_sequences=2, max_new_tokens=3, top_k=2, out_dir=out, progress=False)
    other_model = build_model("qwen2", 0)
    with pytest.raises(ValueError, match="holds a replay buffer made with other settings.*config_hash"):
        generate_replay(other_model, num_sequences=2, max_new_tokens=3, top_k=2, out_dir=out, progress=False)
    with pytest.raises(ValueError, match="other settings.*seed"):
        generate_replay(build_model("llama", 0), num_sequences=2, max_new_tokens=3, top_k=2, out_dir=out,
                        seed=1, progress=False)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a buffer")
    with pytest.raises(ValueError, match="not empty and holds no replay buffer"):
        generate_replay(build_model("llama", 0), num_sequences=2, max_new_tokens=3, top_k=2, out_dir=str(junk),
                        progress=False)
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "metadata.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a replay buffer"):
        generate_replay(build_model("llama", 0), num_sequences=2, max_new_tokens=3, top_k=2,
                        out_dir=str(tmp_path / "alien"), progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_sequences=0), ValueError, "num_sequences"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(num_sequences=2.5), ValueError, "num_sequences"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(shard_size=0), ValueError, "shard_size"),
        (dict(prompts=["hello"]), ValueError, "tokenizer"),
        (dict(prompts=[[1, 99]]), ValueError, r"prompts\[0\] holds token 99"),
        (dict(prompts=[[]]), ValueError, r"prompts\[0\] is empty"),
        (dict(prompts=[]), ValueError, "at least one prompt"),
        (dict(prompts="abc"), TypeError, "prompts"),
        (dict(eos_token_id=480), ValueError, "eos_token_id 480"),
        (dict(drafter="medusa"), ValueError, "drafter"),
        (dict(drafter=object()), TypeError, "drafter"),
        (dict(max_new_tokens=70), ValueError, "max_position_embeddings"),
        (dict(logprob_dtype="bfloat16"), ValueError, "logprob_dtype"),
        (dict(sampled_draws=0), ValueError, "sampled_draws"),
        (dict(out_dir=3), TypeError, "out_dir"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    base = dict(num_sequences=2, max_new_tokens=3, top_k=2, progress=False)
    base.update(kwargs)
    with pytest.raises(error, match=match):
        generate_replay(build_model("llama", 0), **base)


def test_bad_model_and_conflicting_drafters_are_refused():
    with pytest.raises(TypeError, match="model must be a Hugging Face causal LM"):
        generate_replay(torch.nn.Linear(2, 2), num_sequences=2, max_new_tokens=3, progress=False)
    model = build_model("llama", 0)
    with pytest.raises(ValueError, match="either draft_model or drafter"):
        generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=2, draft_model=model, drafter="ngram",
                        progress=False)
    with pytest.raises(ValueError, match="max_ngram"):
        NGramDrafter(max_ngram=0)


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def test_generate_command(tmp_path, capsys):
    from selfreplay_fast import cli

    model_dir, draft_dir, out = tmp_path / "model", tmp_path / "draft", tmp_path / "out"
    build_model("llama", 0).save_pretrained(model_dir)
    build_model("llama", 1, layers=1).save_pretrained(draft_dir)
    assert cli.main([
        "generate", "--model", str(model_dir), "--out", str(out), "--num-sequences", "5", "--max-new-tokens", "6",
        "--top-k", "4", "--draft", str(draft_dir), "--batch-size", "2", "--seed", "3", "--device", "cpu",
        "--no-progress", "--logprob-dtype", "float32",
    ]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["buffer"]["sequences"] == 5 and 0 <= summary["this_run"]["acceptance_rate"] <= 1
    buffer = ReplayBuffer.load(str(out), expected_vocab_size=48)
    assert len(buffer) == 5 and buffer.k == 4
    assert buffer.metadata["generation"]["drafter"]["type"] == "ModelDrafter"
    assert_teacher_matches_full_forward(build_model("llama", 0), buffer, 4)


def test_progress_bar_reports_sequences(capsys):
    model = build_model("llama", 13)
    buffer = generate_replay(model, num_sequences=6, max_new_tokens=5, top_k=4, batch_size=2, progress=True,
                             drafter="ngram")
    err = capsys.readouterr().err
    assert "generate_replay" in err and "6/6" in err
    stats = buffer.generation_stats.as_dict()
    assert stats["sequences"] == 6 and stats["generated_tokens"] == buffer.num_tokens - 6
    assert stats["tokens_per_second"] > 0 and 0 <= stats["acceptance_rate"] <= 1


def test_ngram_drafter_proposals():
    tokens = torch.zeros(3, 13, dtype=torch.long)
    seqs = [[1, 5, 6, 7, 5, 6], [1, 2, 3, 4], [1, 9, 9, 9]]
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)] = torch.tensor(seq)
    state = DecodeState(tokens, torch.tensor([len(s) for s in seqs]), torch.ones(3, dtype=torch.bool),
                                    None, 1.0, 12)
    drafts, probs = NGramDrafter().propose(state, 5)
    assert probs is None  # deterministic proposal
    assert drafts.tolist() == [
        [7, 5, 6, 7, 5],  # "5 6" occurred before, followed by "7 5 6": continued periodically
        [4, 4, 4, 4, 4],  # no earlier occurrence of any suffix: the last token repeated
        [9, 9, 9, 9, 9],
    ]


def test_model_ignoring_custom_masks_is_detected():
    class MaskIgnoringLlama(LlamaForCausalLM):
        """Stands in for architectures that rebuild their own mask (e.g. ALiBi) and ignore ours."""

        def forward(self, *args, attention_mask=None, **kwargs):
            return super().forward(*args, attention_mask=None, **kwargs)

    source = build_model("llama", 0)
    model = MaskIgnoringLlama(source.config).eval()
    model.load_state_dict(source.state_dict())
    with pytest.raises(NotImplementedError, match="does not reproduce its plain forward pass"):
        generate_replay(model, num_sequences=2, max_new_tokens=3, top_k=2, progress=False)


@pytest.mark.parametrize("num_draft_tokens", [1, 6])
def test_speculative_with_one_or_many_draft_tokens(num_draft_tokens):
    model, draft = build_model("llama", 14), build_model("llama", 15, layers=1)
    buffer = generate_replay(model, num_sequences=5, max_new_tokens=9, top_k=4, batch_size=2, progress=False,
                             draft_model=draft, num_draft_tokens=num_draft_tokens, prompts=[[1, 3]],
                             logprob_dtype=torch.float32)
    assert_teacher_matches_full_forward(model, buffer, 4, [2] * 5)
    stats = buffer.generation_stats
    assert stats.draft_proposed > 0 and 0 <= stats.draft_accepted <= stats.draft_proposed


def test_keep_in_memory_false_writes_shards_only(tmp_path):
    model = build_model("llama", 16)
    kwargs = dict(num_sequences=5, max_new_tokens=6, top_k=4, batch_size=2, shard_size=2, progress=False, seed=4)
    assert generate_replay(model, out_dir=str(tmp_path / "a"), keep_in_memory=False, **kwargs) is None
    in_memory = generate_replay(model, out_dir=str(tmp_path / "b"), **kwargs)
    loaded = ReplayBuffer.load(str(tmp_path / "a"))
    assert torch.equal(loaded.input_ids, in_memory.input_ids)
    assert torch.equal(loaded.teacher_logprobs, in_memory.teacher_logprobs)
    with open(tmp_path / "a" / "metadata.json") as handle:
        assert json.load(handle)["generation_stats"]["sequences"] == 5
    with pytest.raises(ValueError, match="keep_in_memory=False needs out_dir"):
        generate_replay(model, keep_in_memory=False, **kwargs)


def test_cache_compaction_while_every_slot_is_finished(monkeypatch):
    # With delayed finish checks every slot can sit finished (not yet refilled) for several steps. A
    # compaction of the compacting cache then may leave it narrower than a draft block; the rollback
    # must cope (the static cache, the default, has no compaction).
    use_compacting_cache(monkeypatch)

    class EosFirstLlama(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., EOS] += 30.0  # every sequence ends at its first token
            return out

    model = EosFirstLlama(tiny_llama(0).config).eval()
    buffer = generate_replay(model, num_sequences=8, max_new_tokens=3, top_k=2, batch_size=4, drafter="ngram",
                             num_draft_tokens=4, check_every=30, progress=False)
    assert buffer.sequences() == [[BOS, EOS]] * 8
