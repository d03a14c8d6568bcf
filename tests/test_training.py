"""Training integration (model_glue.py, trainer.py, examples/finetune_with_replay.py): no full logits in a
training step, task NLL equal to Hugging Face's loss, ReplayTrainer with PEFT, accumulation, checkpointing."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import selfreplay_fast as sf
from selfreplay_fast import replay_kl as rk

VOCAB = 61
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(kind="llama", seed=0, **over):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                   tie_word_embeddings=False, initializer_range=0.2)
        cfg.update(over)
        return LlamaForCausalLM(LlamaConfig(**cfg))
    cfg = dict(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(over)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def sequences(seed, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def pad_batch(seqs):
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    """A tail-mode buffer recorded from tiny_model('llama', seed=1) (the 'original' model)."""
    teacher = tiny_model(seed=1).eval()
    return sf.build_teacher_cache(teacher, sequences(5, [7, 12, 9, 4, 11, 8, 10, 6]), 4,
                                  tmp_path_factory.mktemp("replay") / "c", progress=False)


def replay_batch(buffer, size=3, seed=0):
    return next(buffer.batches(size, seed=seed))


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# -- model glue ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # gpt2: tied embeddings and an lm_head without bias
def test_task_nll_equals_hf_loss_and_gradients(kind):
    model = tiny_model(kind).train()
    batch = pad_batch(sequences(0, [9, 5, 7]))
    batch["labels"][0, 3] = -100  # an ignored label inside a sequence
    model(**batch).loss.backward()
    expected, expected_grads = model(**batch).loss.detach(), grads(model)
    model.zero_grad(set_to_none=True)
    got = sf.task_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    got.backward()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(model), expected_grads)
    if kind == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight  # tied: one gradient, both uses

    # without labels: input_ids with the padding ignored; another ignore_index; sum and num_items
    labels_from_ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels_from_ids).loss
        torch.testing.assert_close(sf.task_nll(model, batch["input_ids"], batch["attention_mask"]), plain,
                                   rtol=1e-5, atol=1e-6)
        other = batch["labels"].masked_fill(batch["labels"] == -100, -7)
        torch.testing.assert_close(sf.task_nll(model, batch["input_ids"], batch["attention_mask"], other,
                                               ignore_index=-7), expected, rtol=1e-5, atol=1e-6)
        count = int((batch["labels"][:, 1:] != -100).sum())
        total = sf.task_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"], reduction="sum")
        torch.testing.assert_close(total, expected * count, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sf.task_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                               num_items_in_batch=torch.tensor(2 * count)), expected / 2,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tail", "topk"])
def test_replay_kl_loss_equals_reference_on_full_logits(replay, mode):
    model = tiny_model(seed=2).train()
    b = replay_batch(replay)
    loss = sf.ReplayKLLoss(mode=mode, temperature=0.8, impl="torch", chunk_size=5)
    got = loss(model, b)
    got.backward()
    got_grads = grads(model)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    hidden = out.hidden_states[-1]
    ref = sf.reference_replay_kl(hidden, model.lm_head.weight, b["teacher_ids"], b["teacher_logprobs"], mask=b["mask"],
                                 teacher_tail_logprob=b["teacher_tail_logprob"] if mode == "tail" else None,
                                 mode=mode, temperature=0.8)
    # and directly from the model's own logits
    logits = out.logits.double() / 0.8
    if mode == "tail":
        log_q = logits.log_softmax(-1)
        ids, lp = b["teacher_ids"].long(), b["teacher_logprobs"].double()
        used = ids >= 0
        q_top = log_q.gather(-1, ids.clamp_min(0))
        tail_p = b["teacher_tail_logprob"].double()
        q_rest = torch.log1p(-torch.where(used, q_top.exp(), 0.0).sum(-1).clamp_max(1 - 1e-12))
        row = torch.where(used, lp.exp() * (lp - q_top), 0.0).sum(-1) + torch.where(
            torch.isinf(tail_p), 0.0, tail_p.exp() * (tail_p - q_rest))
        direct = row[b["mask"]].mean()
        torch.testing.assert_close(got.detach().double(), direct, rtol=1e-4, atol=1e-6)
    ref.backward()
    torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(got_grads, grads(model))


def test_no_full_logits_in_a_training_step(replay, monkeypatch):
    model = tiny_model().train()

    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head computed full logits")

    monkeypatch.setattr(model.lm_head, "forward", refuse)
    with pytest.raises(AssertionError, match="full logits"):  # the guard works
        model(input_ids=torch.tensor([[3, 4, 5]]))
    task = pad_batch(sequences(0, [9, 5, 7]))
    task_loss, kl, loss = sf.replay_step(model, task, replay_batch(replay), replay_weight=2.0)
    loss.backward()
    torch.testing.assert_close(loss, task_loss + 2.0 * kl)
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    assert sf.last_hidden_states(model, task["input_ids"]).shape == (3, 9, 16)


def test_gradient_checkpointing_gives_equal_gradients(replay):
    model = tiny_model().train()
    task, b = pad_batch(sequences(0, [9, 5, 7])), replay_batch(replay)
    sf.replay_step(model, task, b, 3.0).loss.backward()
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    calls = []
    layer = model.model.layers[0]
    original = layer._gradient_checkpointing_func if hasattr(layer, "_gradient_checkpointing_func") else None
    if original is not None:
        layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or original(*a, **k)
    sf.replay_step(model, task, b, 3.0).loss.backward()
    assert original is None or calls, "checkpointing did not run"
    assert_grads_close(grads(model), plain)


def test_bf16_autocast_step_runs_close_to_fp32(replay):
    model = tiny_model().train()
    task, b = pad_batch(sequences(0, [9, 5, 7])), replay_batch(replay)
    with torch.no_grad():
        full = sf.replay_step(model, task, b, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = sf.replay_step(model, task, b, 1.0)
    half.loss.backward()
    assert half.loss.dtype == torch.float32 and torch.isfinite(half.loss)
    torch.testing.assert_close(half.task_loss, full.task_loss, rtol=3e-2, atol=3e-2)
    assert all(torch.isfinite(g).all() for g in grads(model).values())


def test_peft_lora_model_glue(replay, monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    base, weight, bias = sf.lm_head_of(model)
    assert weight is model.get_base_model().lm_head.weight and not weight.requires_grad and bias is None

    def refuse(*args, **kwargs):
        raise AssertionError("weight gradient computed for a frozen lm_head")

    monkeypatch.setattr(rk._HeadMatmuls, "accumulate_grad_weight", refuse)
    sf.replay_step(model, pad_batch(sequences(0, [9, 5])), replay_batch(replay), 1.0).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora and all(p.grad is not None for p in lora) and weight.grad is None

    # lm_head trained fully through modules_to_save: the adapter's copy is the head
    saved = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    _, w2, _ = sf.lm_head_of(saved)
    assert w2.requires_grad and w2 is not saved.get_base_model().lm_head.original_module.weight
    with torch.no_grad():
        ids = torch.tensor([[3, 4, 5, 6]])
        torch.testing.assert_close(sf.task_nll(saved, ids), saved(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)

    lora_head = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(NotImplementedError, match="lm_head"):
        sf.lm_head_of(lora_head)


# -- ReplayTrainer -------------------------------------------------------------------------------------


class _Seqs(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return {"input_ids": self.seqs[i]}


def _collate(rows):
    return pad_batch([r["input_ids"] for r in rows])


def make_trainer(tmp_path, model, buffer, *, callbacks=(), collator=_collate, **over):
    from transformers import TrainingArguments

    replay_kwargs = {k: over.pop(k) for k in list(over)
                     if k.startswith("replay_") or k in ("validate_replay", "eval_replay_buffer")}
    replay_kwargs.setdefault("replay_weight", 2.0)
    replay_kwargs.setdefault("replay_batch_size", 2)
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, logging_steps=2,
                use_cpu=True, report_to=[], save_strategy="no", learning_rate=1e-2, remove_unused_columns=False,
                disable_tqdm=True, seed=0)
    args.update(over)
    return sf.ReplayTrainer(model=model, args=TrainingArguments(**args),
                            train_dataset=_Seqs(sequences(7, [6, 8, 11, 4, 9, 7, 12, 5])), data_collator=collator,
                            replay_buffer=buffer, callbacks=list(callbacks), **replay_kwargs)


def test_trainer_logs_task_loss_and_replay_kl_without_full_logits(tmp_path, replay, monkeypatch):
    model = tiny_model()

    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head computed full logits")

    monkeypatch.setattr(model.lm_head, "forward", refuse)
    before = model.lm_head.weight.detach().clone()
    trainer = make_trainer(tmp_path, model, replay)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["replay_kl"] > 0 and entry["task_loss"] > 0
        assert math.isclose(entry["loss"], entry["task_loss"] + 2.0 * entry["replay_kl"], rel_tol=1e-4)
    assert not torch.equal(before, model.lm_head.weight.detach())  # the head was trained through the fused loss
    # 4 steps x 2 replay sequences over an 8-sequence buffer: one full pass; the next batch starts the
    # second pass, reshuffled with seed replay_seed + 1, on the training device
    assert trainer.replay_passes == 1 and trainer.replay_position == 4
    nxt = trainer.next_replay_batch()
    assert trainer.replay_passes == 1 and nxt["input_ids"].device == trainer.args.device
    assert nxt["indices"].tolist() == torch.randperm(8, generator=torch.Generator().manual_seed(1))[:2].tolist()


def test_trainer_with_peft_lora_never_computes_the_head_weight_gradient(tmp_path, replay, monkeypatch):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    def refuse(*args, **kwargs):
        raise AssertionError("weight gradient computed for a frozen lm_head")

    monkeypatch.setattr(rk._HeadMatmuls, "accumulate_grad_weight", refuse)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # Non-reentrant checkpointing (transformers 5's default; 4.x's reentrant one gives frozen-embedding LoRA
    # models no gradient at all)
    trainer = make_trainer(tmp_path, model, replay, max_steps=2, gradient_accumulation_steps=2,
                           gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer.train()
    assert model.get_base_model().lm_head.weight.grad is None
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed and all("lora" in n for n in changed)
    assert any("replay_kl" in entry for entry in trainer.state.log_history)


def _one_sgd_step(tmp_path, batch, accumulation, replay):
    model = tiny_model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, replay, per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, replay_batch_size=batch, max_steps=1,
                           optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                           weight_decay=0.0, logging_steps=1)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}, log


def test_gradient_accumulation_equals_one_big_batch(tmp_path, replay):
    """2 micro-batches of 2 (task) and 2 (replay) give the update of one batch of 4 and 4: both terms
    are normalized by the token counts of the whole accumulation window."""
    big, big_log = _one_sgd_step(tmp_path / "a", 4, 1, replay)
    accumulated, acc_log = _one_sgd_step(tmp_path / "b", 2, 2, replay)
    assert_grads_close(accumulated, big, rtol=1e-4, atol=1e-6)
    for key in ("loss", "task_loss", "replay_kl"):
        assert math.isclose(acc_log[key], big_log[key], rel_tol=1e-4), key


def _collate_without_task_tokens(rows):
    batch = _collate(rows)
    batch["labels"] = torch.full_like(batch["labels"], -100)  # e.g. completion-only masking of short rows
    return batch


def test_a_window_without_task_tokens_trains_on_replay_alone(tmp_path, replay):
    """An accumulation window whose labels are all -100: the task term is 0 (not 0/0 = NaN), the replay term
    still counts, and the update equals SGD on lambda * KL over the window's replay batches, computed from
    the model's full logits with the reference."""
    model = tiny_model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, replay, collator=_collate_without_task_tokens, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, max_steps=1, optim="sgd", learning_rate=1.0,
                           lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1)
    trainer.train()
    got = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = next(entry for entry in trainer.state.log_history if "loss" in entry)

    expected_model = tiny_model(seed=3)
    window = list(replay.batches(2, seed=0))[:2]  # the replay stream's first pass, seed replay_seed = 0
    count = sum(int(b["mask"].sum()) for b in window)
    kl_sum = 0
    for b in window:
        out = expected_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        kl_sum = kl_sum + sf.reference_replay_kl(
            out.hidden_states[-1], expected_model.lm_head.weight, b["teacher_ids"], b["teacher_logprobs"],
            mask=b["mask"], teacher_tail_logprob=b["teacher_tail_logprob"], reduction="sum")
    (2.0 * kl_sum / count).backward()
    assert_grads_close(got, grads(expected_model), rtol=1e-4, atol=1e-6)
    assert log["task_loss"] == 0.0
    assert math.isclose(log["replay_kl"], float(kl_sum.detach()) / count, rel_tol=1e-4)
    assert math.isclose(log["loss"], 2.0 * log["replay_kl"], rel_tol=1e-4)


def test_task_nll_of_a_batch_without_counted_tokens_is_zero_with_zero_gradients():
    model = tiny_model()
    ids = torch.tensor([[3, 4, 5, 6]])
    labels = torch.full_like(ids, -100)
    for num_items in (None, torch.tensor(0), 0):
        loss = sf.task_nll(model, ids, labels=labels, num_items_in_batch=num_items)
        loss.backward()
        assert loss.item() == 0.0, num_items
        assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters()), num_items
        model.zero_grad(set_to_none=True)


def test_evaluation_without_full_logits_logs_the_drift_on_held_out_replay(tmp_path, replay, monkeypatch):
    """Trainer.evaluate: eval_loss through the fused path equals plain Trainer's (full logits), and the held-out
    replay's drift is logged as eval_replay_kl / eval_replay_nll (+ stderr), equal to measure_forgetting's."""
    from transformers import Trainer, TrainingArguments

    train_part, held_out = replay.select(slice(0, 5)), replay.select(slice(5, 8))
    eval_data = _Seqs(sequences(11, [5, 9, 7, 4, 10]))
    model = tiny_model(seed=4)
    plain = Trainer(model=model, args=TrainingArguments(str(tmp_path / "plain"), use_cpu=True, report_to=[],
                                                        per_device_eval_batch_size=2, remove_unused_columns=False),
                    eval_dataset=eval_data, data_collator=_collate)
    expected = plain.evaluate()["eval_loss"]

    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head computed full logits")

    monkeypatch.setattr(model.lm_head, "forward", refuse)
    trainer = make_trainer(tmp_path, model, train_part, eval_replay_buffer=held_out, per_device_eval_batch_size=2)
    trainer.eval_dataset = eval_data
    metrics = trainer.evaluate()
    assert math.isclose(metrics["eval_loss"], expected, rel_tol=1e-5)
    drift = sf.measure_forgetting(model, held_out, batch_size=2, progress=False)
    for key, value in drift.as_dict("eval_").items():
        assert math.isclose(metrics[key], value, rel_tol=1e-6), key
    assert metrics["eval_replay_kl"] > 0 and metrics["eval_replay_kl_stderr"] > 0
    assert any("eval_replay_kl" in entry for entry in trainer.state.log_history)  # logged, not only returned
    with pytest.raises(ValueError, match="eval_replay_buffer.*vocabulary"):
        make_trainer(tmp_path, model, train_part, eval_replay_buffer=sf.ReplayBuffer(
            held_out.input_ids, held_out.lengths, held_out.teacher_ids, held_out.teacher_logprobs,
            held_out.teacher_tail_logprob, vocab_size=VOCAB + 3))


def test_trainer_bf16_on_cpu(tmp_path, replay, monkeypatch):
    """bf16=True with use_cpu: accelerate's CPU autocast, entered by compute_loss itself (the base model is
    called past the model's wrapped forward)."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # transformers 4.x sets it for the whole process
    model = tiny_model()
    trainer = make_trainer(tmp_path, model, replay, bf16=True, max_steps=2)
    seen = []
    original = model.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(*args, **kwargs)

    model.model.forward = spy
    trainer.train()
    assert seen and all(seen)
    assert all(math.isfinite(entry["replay_kl"]) for entry in trainer.state.log_history if "replay_kl" in entry)


def test_trainer_checks_task_labels_once_per_accumulation_window(tmp_path, replay, monkeypatch):
    """The label range check runs on each accumulation window as get_batch_samples fetches it (one host
    sync per optimizer step), and the training steps skip task_nll's own check (a sync per micro-step)."""
    from selfreplay_fast import model_glue, trainer as trainer_module

    per_step_checks, windows = [], []
    original_check, original_window = model_glue.check_task_targets, trainer_module.ReplayTrainer._check_task_window
    monkeypatch.setattr(model_glue, "check_task_targets", lambda *a, **k: per_step_checks.append(1) or original_check(*a, **k))

    def window_spy(self, batch_samples):
        windows.append(len(batch_samples))
        return original_window(self, batch_samples)

    monkeypatch.setattr(trainer_module.ReplayTrainer, "_check_task_window", window_spy)
    trainer = make_trainer(tmp_path, tiny_model(), replay, max_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    assert windows == [2, 2] and per_step_checks == []

    # A label outside the vocabulary in the second micro-batch: refused before any forward runs.
    def bad_labels(rows):
        batch = pad_batch([r["input_ids"] for r in rows])
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        if bad_labels.calls == 1:
            batch["labels"][0, 2] = VOCAB
        bad_labels.calls += 1
        return batch

    bad_labels.calls = 0
    model = tiny_model()
    trainer = make_trainer(tmp_path, model, replay, max_steps=1, gradient_accumulation_steps=2)
    trainer.data_collator = bad_labels

    def refuse(*args, **kwargs):
        raise AssertionError("a forward ran before the window's labels were checked")

    monkeypatch.setattr(model.model, "forward", refuse)
    with pytest.raises(ValueError, match=rf"labels: expected ids in \[0, {VOCAB}\)"):
        trainer.train()


def test_resumed_training_continues_the_replay_stream(tmp_path, replay):
    """Stopped after the checkpoint at step 2 and resumed with train(resume_from_checkpoint=True): the same
    parameters as 6 uninterrupted steps (the replay stream of 3 batches per pass crosses a pass boundary)."""
    from transformers import TrainerCallback

    def run(out, stop_at=None, resume=False):
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop_at is not None and state.global_step == stop_at:
                    control.should_training_stop = True

        model = tiny_model(seed=4)
        trainer = make_trainer(out, model, replay, callbacks=[Stop()], max_steps=6, replay_batch_size=3,
                               save_strategy="steps", save_steps=2, logging_steps=1)
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}

    straight, expected = run(tmp_path / "a")
    stopped, _ = run(tmp_path / "b", stop_at=2)
    state = json.loads((tmp_path / "b" / "out" / "checkpoint-2" / "replay_state.json").read_text())
    assert state["replay_position"] == 2 == stopped.replay_position
    resumed, got = run(tmp_path / "b", resume=True)
    assert resumed.state.global_step == 6 and resumed.replay_position == straight.replay_position == 6
    assert resumed.replay_passes == straight.replay_passes == 2  # 8 sequences in batches of 3: 3 per pass
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    # the replay log means after the resume count the steps since the resume, not since step 0
    logged = {e["step"]: e for e in resumed.state.log_history if "replay_kl" in e}
    reference = {e["step"]: e for e in straight.state.log_history if "replay_kl" in e}
    assert sorted(logged) == sorted(reference) == list(range(1, 7))
    for step, entry in logged.items():
        assert math.isclose(entry["loss"], entry["task_loss"] + 2.0 * entry["replay_kl"], rel_tol=1e-4), step
        assert math.isclose(entry["replay_kl"], reference[step]["replay_kl"], rel_tol=1e-4), step
    # a checkpoint of other replay settings: a warning, and the stream restarts
    other = make_trainer(tmp_path / "b", tiny_model(seed=4), replay, max_steps=6, replay_batch_size=2,
                         save_strategy="no")
    with pytest.warns(UserWarning, match="replay_batch_size: 3 then, 2 now"):
        other._restore_replay_state(str(tmp_path / "b" / "out" / "checkpoint-2"))
    assert other.replay_position == 0


# -- bad input -----------------------------------------------------------------------------------------


def test_bad_input(tmp_path, replay):
    model = tiny_model()
    other_vocab = sf.ReplayBuffer(replay.input_ids, replay.lengths, replay.teacher_ids, replay.teacher_logprobs,
                                  replay.teacher_tail_logprob, vocab_size=VOCAB + 3)
    with pytest.raises(ValueError, match="replay_buffer.*vocabulary"):
        make_trainer(tmp_path, model, other_vocab)
    replay.save(str(tmp_path / "saved"))
    with pytest.raises(Exception, match="expected_vocab_size"):
        make_trainer(tmp_path, tiny_model(vocab_size=VOCAB + 1), str(tmp_path / "saved"))
    for weight, err in ((-1.0, ValueError), (float("nan"), ValueError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(err, match="replay_weight"):
            make_trainer(tmp_path, model, replay, replay_weight=weight)
        with pytest.raises(err, match="replay_weight"):
            sf.replay_step(model, pad_batch(sequences(0, [5])), replay_batch(replay), weight)
    with pytest.raises(ValueError, match="replay_batch_size"):
        make_trainer(tmp_path, model, replay, replay_batch_size=0)
    with pytest.raises(ValueError, match="replay_loss has mode='sampled'"):
        make_trainer(tmp_path, model, replay, replay_loss=sf.ReplayKLLoss(mode="sampled"))
    with pytest.raises(TypeError, match="replay_buffer"):
        make_trainer(tmp_path, model, {"input_ids": 1})

    for field, value, match in (("final_logit_softcapping", 30.0, "softcapping"), ("logit_scale", 0.5, "logit_scale"),
                                ("logits_scaling", 4.0, "logits_scaling")):
        capped = tiny_model()
        setattr(capped.config, field, value)
        with pytest.raises(NotImplementedError, match=match):
            sf.task_nll(capped, torch.tensor([[3, 4, 5]]))
        with pytest.raises(NotImplementedError, match=match):
            make_trainer(tmp_path, capped, replay)

    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="labels"):
        sf.task_nll(model, ids, labels=torch.tensor([[3, 4, VOCAB]]))
    with pytest.raises(ValueError, match="labels"):
        sf.task_nll(model, ids, labels=torch.tensor([[3, 4]]))
    with pytest.raises(ValueError, match="input_ids"):
        sf.task_nll(model, torch.tensor([[3]]))
    for bad in (-1, float("nan"), True, torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            sf.task_nll(model, ids, num_items_in_batch=bad)
    with pytest.raises(KeyError, match="teacher_tail_logprob"):
        sf.ReplayKLLoss()(model, {k: v for k, v in replay_batch(replay).items() if k != "teacher_tail_logprob"})
    with pytest.raises(ValueError, match="mode"):
        sf.ReplayKLLoss(mode="full")
    with pytest.raises(TypeError, match="causal LM"):
        sf.lm_head_of(torch.nn.Linear(2, 2))


# -- the example script --------------------------------------------------------------------------------


def test_example_script_end_to_end(tmp_path):
    pytest.importorskip("peft")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    raw = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    lines = [json.dumps({"input_ids": s}) for s in sequences(9, [6, 9, 5, 8])] + [json.dumps({"text": "w7 w8 w9 w10"})]
    data.write_text("\n".join(lines) + "\n")
    script = os.path.join(ROOT, "examples", "finetune_with_replay.py")
    common = [sys.executable, script, "--model", str(model_dir), "--data", str(data), "--replay", str(tmp_path / "replay"),
              "--batch-size", "2", "--max-steps", "3", "--logging-steps", "1", "--no-progress", "--replay-weight", "3"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(common + ["--out", str(tmp_path / "run1"), "--generate", "6", "--replay-max-new-tokens", "8",
                                   "--replay-top-k", "5", "--lora-rank", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "replay KL" in run.stdout and "done: 3 steps" in run.stdout
    report = json.loads((tmp_path / "run1" / "train_report.json").read_text())
    assert report["global_step"] == 3 and report["train_sequences"] == 5 and report["replay_sequences"] == 6
    assert len(report["log"]) == 3 and all(entry["replay_kl"] >= 0 for entry in report["log"])
    _assert_log_printed_once(run.stdout, report["log"])
    assert (tmp_path / "run1" / "adapter_config.json").exists()
    assert (tmp_path / "run1" / "tokenizer_config.json").exists()  # the tokenizer is saved with the adapter
    # second run: load the buffer written by the first, full fine-tuning, checkpoints every 2 steps
    run = subprocess.run(common + ["--out", str(tmp_path / "run2"), "--no-save", "--save-steps", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 3 steps" in run.stdout
    assert json.loads((tmp_path / "run2" / "checkpoint-2" / "replay_state.json").read_text())["replay_position"] == 2
    assert (tmp_path / "run2" / "checkpoint-2" / "tokenizer_config.json").exists()
    # --resume continues after the last checkpoint (step 3 of 3 is done: nothing left to train)
    run = subprocess.run(common + ["--out", str(tmp_path / "run2"), "--no-save", "--resume", "--max-steps", "4"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: 4 steps" in run.stdout
    # the report holds the whole run: steps 1-3 from before the resume (the checkpoint's log) and step 4
    resumed = json.loads((tmp_path / "run2" / "train_report.json").read_text())["log"]
    assert [entry["step"] for entry in resumed] == [1, 2, 3, 4]
    _assert_log_printed_once(run.stdout, resumed[3:])


def _assert_log_printed_once(stdout, log):
    """Every logged step is printed once, as 'step N: task loss X  replay KL Y' with X and Y the logged values
    to 5 significant digits (so that a KL of 1e-6 is not shown as 0), and Trainer's log dicts are not printed."""
    import re

    printed = re.findall(r"^step (\d+): task loss (\S+)  replay KL (\S+)$", stdout, flags=re.M)
    assert [int(step) for step, _, _ in printed] == [entry["step"] for entry in log], stdout
    for (_, task, kl), entry in zip(printed, log):
        assert math.isclose(float(task), entry["task_loss"], rel_tol=1e-4)
        assert math.isclose(float(kl), entry["replay_kl"], rel_tol=1e-4, abs_tol=0.0)
    assert "'task_loss'" not in stdout, stdout


def test_trainer_takes_an_nll_replay_loss_whatever_its_kl_mode(tmp_path, replay):
    """loss='nll' needs no teacher, so its (unused) KL mode need not match the buffer's; the trainer's replay
    term is then the replay text's next-token NLL, checked against task_nll on the same batch."""
    model = tiny_model()
    nll = sf.ReplayKLLoss(mode="sampled", loss="nll")
    trainer = make_trainer(tmp_path, model, replay, replay_loss=nll)
    assert trainer.replay_loss is nll
    batch = replay_batch(replay)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    expected = sf.task_nll(model, batch["input_ids"], batch["attention_mask"], labels)
    assert torch.allclose(trainer.replay_loss(model, batch), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="replay_loss has mode='sampled'"):
        make_trainer(tmp_path, model, replay, replay_loss=sf.ReplayKLLoss(mode="sampled"))
