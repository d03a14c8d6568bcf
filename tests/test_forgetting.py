"""measure_forgetting (forgetting.py): the drift of a model from the cached teacher, against the model's
own full logits in float64, with standard errors recomputed from the per-sequence values."""

import math

import pytest
import torch

import selfreplay_fast as sf
from selfreplay_fast.forgetting import ratio_estimate
from text_data import RandomTexts, collate_padded

VOCAB = 37


def tiny_model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                        initializer_range=0.3))


@pytest.fixture(scope="module")
def buffers(tmp_path_factory):
    """Top-5 and top-V (exact) tail-mode caches of tiny_model(1) on 7 sequences of uneven lengths."""
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (6, 11, 3, 9, 14, 5, 8)]
    teacher = tiny_model(1).eval()
    root = tmp_path_factory.mktemp("forgetting")
    return {k: sf.build_teacher_cache(teacher, seqs, k, root / f"k{k}", progress=False,
                                          logprob_dtype=torch.float32) for k in (5, VOCAB)} | {
        "dir": root / "k5"}


def _per_sequence_reference(model, buffer, temperature):
    """(kl sums, nll sums, counts) per sequence from the model's full logits in float64."""
    kl, nll, counts = [], [], []
    for i, seq in enumerate(buffer.sequences()):
        n = len(seq)
        ids = torch.tensor([seq])
        logq = (model(input_ids=ids).logits[0].double() / temperature).log_softmax(-1)  # [n, V]
        t_ids = buffer.teacher_ids[i, :n].long()
        t_lp = buffer.teacher_logprobs[i, :n].double()
        tail = buffer.teacher_tail_logprob[i, :n].double()
        rows = t_ids[:, 0] >= 0
        used = t_ids >= 0
        q_top = logq.gather(-1, t_ids.clamp_min(0))
        q_rest = torch.log1p(-torch.where(used, q_top.exp(), 0.0).sum(-1).clamp_max(1 - 1e-15))
        row_kl = torch.where(used, t_lp.exp() * (t_lp - q_top), 0.0).sum(-1) + torch.where(
            torch.isinf(tail), 0.0, tail.exp() * (tail - q_rest))
        nxt = torch.tensor(seq[1:] + [0])
        row_nll = -logq.gather(-1, nxt[:, None])[:, 0]
        kl.append(float(row_kl[rows].sum()))
        nll.append(float(row_nll[rows].sum()))
        counts.append(int(rows.sum()))
    return torch.tensor(kl, dtype=torch.float64), torch.tensor(nll, dtype=torch.float64), torch.tensor(counts)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_drift_equals_the_full_logits_reference(buffers, temperature, monkeypatch):
    model = tiny_model(2).train()  # another model: a real drift
    buffer = buffers[5]
    with torch.no_grad():
        kl, nll, counts = _per_sequence_reference(model, buffer, temperature)

    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head computed full logits")

    monkeypatch.setattr(model.lm_head, "forward", refuse)
    report = sf.measure_forgetting(model, buffer, batch_size=3, temperature=temperature, progress=False)
    assert model.training  # put back in training mode
    assert report.num_sequences == 7 and report.num_tokens == int(counts.sum()) and report.mode == "tail"
    m = 7
    for got, sums in ((report.replay_kl, kl), (report.replay_nll, nll)):
        mean = float(sums.sum() / counts.sum())
        se = math.sqrt(m / (m - 1) * float(((sums - mean * counts) ** 2).sum())) / float(counts.sum())
        assert math.isclose(got.value, mean, rel_tol=1e-5), (got, mean)
        assert math.isclose(got.stderr, se, rel_tol=1e-4), (got, se)
    assert report.replay_kl.value > 0.05 and report.replay_nll.value > report.replay_kl.value
    logged = report.as_dict("eval_")
    assert logged["eval_replay_kl"] == report.replay_kl.value and logged["eval_replay_nll_stderr"] == report.replay_nll.stderr


def test_the_original_model_has_no_drift(buffers):
    """With k = V the tail-mode KL is the full KL: 0 for the model that recorded the cache, and its NLL is
    the teacher's own entropy-weighted surprise (positive)."""
    report = sf.measure_forgetting(tiny_model(1), buffers[VOCAB], batch_size=4, progress=False)
    assert abs(report.replay_kl.value) < 1e-6 and report.replay_kl.stderr < 1e-6
    assert report.replay_nll.value > 1.0


def test_sharded_buffer_gives_the_same_report(buffers):
    model = tiny_model(2)
    opened = sf.ReplayBuffer.open(buffers["dir"])
    assert sf.measure_forgetting(model, opened, batch_size=2, progress=False) == sf.measure_forgetting(
        model, buffers[5], batch_size=2, progress=False)


def test_ratio_estimate_edge_cases():
    one = ratio_estimate(torch.tensor([3.0]), torch.tensor([2]))
    assert one.value == 1.5 and math.isnan(one.stderr)
    none = ratio_estimate(torch.tensor([0.0, 0.0]), torch.tensor([0, 0]))
    assert math.isnan(none.value) and math.isnan(none.stderr)


def test_bad_input(buffers):
    model = tiny_model(2)
    with pytest.raises(ValueError, match="batch_size"):
        sf.measure_forgetting(model, buffers[5], batch_size=0)
    with pytest.raises(TypeError, match="replay"):
        sf.measure_forgetting(model, {"input_ids": 1})
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB + 1, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="vocabulary"):
        sf.measure_forgetting(other, buffers[5])


# -- ForgettingCallback ----------------------------------------------------------------------------------


def _plain_trainer(tmp_path, model, **over):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=4, eval_strategy="steps", eval_steps=2,
                logging_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=3, learning_rate=0.05,
                save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
    args.update(over)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=RandomTexts(8, VOCAB, seed=0),
                   eval_dataset=RandomTexts(3, VOCAB, seed=1), data_collator=collate_padded)


def test_callback_logs_the_drift_of_a_plain_trainer_at_every_evaluation(buffers, tmp_path):
    model = tiny_model(1)  # the original model: drift starts at 0 and grows with training
    trainer = _plain_trainer(tmp_path, model)
    callback = sf.ForgettingCallback(trainer, buffers[VOCAB])
    trainer.add_callback(callback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_replay_kl" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert 0 < logged[0]["eval_replay_kl"] < logged[1]["eval_replay_kl"]
    final = sf.measure_forgetting(model, buffers[VOCAB], batch_size=3, progress=False)
    assert final.as_dict("eval_") == {k: logged[1][k] for k in final.as_dict("eval_")}
    assert trainer.evaluate()["eval_replay_kl"] == final.replay_kl.value  # returned by evaluate() too


def test_callback_warns_or_stops_past_the_threshold(buffers, tmp_path):
    trainer = _plain_trainer(tmp_path / "warn", tiny_model(1))
    trainer.add_callback(sf.ForgettingCallback(trainer, buffers[VOCAB], max_replay_kl=1e-9))
    with pytest.warns(UserWarning, match="eval_replay_kl"):
        trainer.train()
    assert trainer.state.global_step == 4
    trainer = _plain_trainer(tmp_path / "stop", tiny_model(1))
    trainer.add_callback(sf.ForgettingCallback(trainer, buffers[VOCAB], max_replay_kl=1e-9, on_exceed="stop"))
    with pytest.warns(UserWarning, match="training stops"):
        trainer.train()
    assert trainer.state.global_step == 2
    for bad in (dict(on_exceed="halt"), dict(max_replay_kl=-1.0), dict(max_replay_kl=float("nan")), dict(batch_size=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            sf.ForgettingCallback(trainer, buffers[VOCAB], **bad)
