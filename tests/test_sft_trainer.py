"""ReplaySFTTrainer (TRL's SFTTrainer + replay): every TRL dataset form feeds the fused task loss, which equals
a float64 full-logit reference on TRL's labels (each packed sequence run on its own) and plain SFTTrainer's loss;
ReplaySFTConfig parses from YAML and argv; ForgettingCallback logs on TRL runs with and without replay."""

import copy
import math

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer, TrlParser  # noqa: E402

import selfreplay_fast as sf  # noqa: E402
from test_training import sequences, tiny_model  # noqa: E402
from trl_data import rows, tiny_tokenizer, trained_words  # noqa: E402

# (dataset form, SFTConfig fields): every form of TRL's language-modeling SFT
FORMS = {
    "text": ("text", {}),
    "prompt_completion": ("prompt_completion", {}),  # completion_only_loss by default
    "messages_assistant_only": ("messages", {"assistant_only_loss": True}),
    "packing_bfd": ("text", {"packing": True, "max_length": 24}),  # padding-free rows with position ids
    "padding_free": ("prompt_completion", {"padding_free": True, "max_length": None}),
}
PACKED = {"packing_bfd", "padding_free"}


@pytest.fixture(scope="module")
def buffer_dir(tmp_path_factory):
    """A tail-mode replay buffer recorded from tiny_model(seed=1), the 'original' model."""
    out = tmp_path_factory.mktemp("replay") / "buffer"
    with torch.inference_mode():
        sf.build_teacher_cache(tiny_model(seed=1).eval(), sequences(5, [7, 12, 9, 4, 11, 8, 10, 6]), 4, str(out),
                               progress=False)
    return str(out)


def _fields(tmp_path, **over):
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, use_cpu=True, report_to=[],
                  max_steps=2, logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-2, seed=0,
                  dataloader_num_workers=0, bf16=False)  # TRL defaults to bf16 autocast, on the CPU too
    fields.update(over)
    return fields


def _replay_trainer(tmp_path, form_name, buffer_dir, model=None, replay_weight=0.0, **over):
    form, form_fields = FORMS[form_name]
    config = sf.ReplaySFTConfig(**_fields(tmp_path, **form_fields, **over), replay_buffer_path=buffer_dir,
                                replay_weight=replay_weight, replay_batch_size=2)
    return sf.ReplaySFTTrainer(model if model is not None else tiny_model(), config,
                               train_dataset=Dataset.from_list(rows(form)), processing_class=tiny_tokenizer())


def _segments(batch, i):
    """(start, end) of the sequences of row i: split where the position ids restart, else the unpadded prefix."""
    if "position_ids" in batch:
        starts = (batch["position_ids"][i] == 0).nonzero().flatten().tolist()
        return list(zip(starts, starts[1:] + [batch["input_ids"].shape[1]]))
    mask = batch["attention_mask"][i]
    length = int(mask.sum())
    assert mask[:length].all(), "right padding expected"
    return [(0, length)]


def reference_nll(model, batch):
    """Mean next-token NLL on TRL's labels from full float64 logits, each sequence run alone (so no token can
    attend across a packed boundary)."""
    model64 = copy.deepcopy(model).double().eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for i in range(batch["input_ids"].shape[0]):
            for start, end in _segments(batch, i):
                logits = model64(input_ids=batch["input_ids"][i:i + 1, start:end]).logits[0, :-1]
                target = batch["labels"][i, start + 1:end]
                keep = target != -100
                logprobs = torch.log_softmax(logits, dim=-1)[keep].gather(1, target[keep][:, None])
                total, count = total - logprobs.sum(), count + int(keep.sum())
    return total / count


def _refuse_full_logits(model, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the lm_head computed full logits")

    monkeypatch.setattr(model.lm_head, "forward", refuse)


@pytest.mark.parametrize("form_name", list(FORMS))
def test_fused_task_loss_equals_float64_reference_for_every_dataset_form(form_name, tmp_path, buffer_dir,
                                                                          monkeypatch):
    trainer = _replay_trainer(tmp_path, form_name, buffer_dir)
    model = trainer.model.train()
    batches = list(trainer.get_train_dataloader())
    # TRL's labels count what the form trains on: counted independently from the rows' words
    counted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    form = FORMS[form_name][0]
    assert counted == sum(trained_words(form, row) for row in rows(form))
    if form_name in PACKED:
        assert all("attention_mask" not in b and b["input_ids"].shape[0] == 1 for b in batches)
        assert sum(int((b["position_ids"] == 0).sum()) for b in batches) == len(rows(form))
    for batch in batches:
        expected = reference_nll(model, batch)
        _refuse_full_logits(model, monkeypatch)
        loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))  # replay_weight 0: the task loss
        monkeypatch.undo()
        assert abs(loss.double().item() - expected.item()) <= 1e-5 * expected.item(), (loss.item(), expected.item())
        if form_name in PACKED:  # the position ids matter: without them the sequences attend to each other
            mixed = sf.task_nll(model, batch["input_ids"], None, batch["labels"])
            assert abs(mixed.double().item() - expected.item()) > 1e-3
    logged = trainer._replay_sums.tolist()  # summed task_loss and replay_kl of the steps, as ReplayTrainer logs
    assert logged[1] > 0 and math.isfinite(logged[0])


@pytest.mark.parametrize("form_name", list(FORMS))
def test_replay_weight_zero_equals_plain_sft_trainer(form_name, tmp_path, buffer_dir):
    ours = _replay_trainer(tmp_path / "ours", form_name, buffer_dir, model=tiny_model(seed=4))
    form, form_fields = FORMS[form_name]
    plain = SFTTrainer(tiny_model(seed=4), SFTConfig(**_fields(tmp_path / "plain", **form_fields)),
                       train_dataset=Dataset.from_list(rows(form)), processing_class=tiny_tokenizer())
    batch = next(iter(plain.get_train_dataloader()))
    num_items = (batch["labels"][:, 1:] != -100).sum() + 5  # as Trainer passes it for an accumulation window
    for kwargs in ({}, {"num_items_in_batch": num_items}):
        losses, grads = [], []
        for trainer in (ours, plain):
            model = trainer.model.train()
            model.zero_grad()
            loss = trainer.compute_loss(model, trainer._prepare_inputs(dict(batch)), **kwargs)
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_training_logs_task_loss_and_replay_kl_without_full_logits(tmp_path, buffer_dir, monkeypatch):
    model = tiny_model()
    _refuse_full_logits(model, monkeypatch)
    head_before = model.lm_head.weight.detach().clone()
    trainer = _replay_trainer(tmp_path, "packing_bfd", buffer_dir, model=model, replay_weight=3.0,
                              per_device_train_batch_size=1, max_steps=4, logging_steps=2,
                              gradient_accumulation_steps=2)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        assert entry["task_loss"] > 0 and entry["replay_kl"] > 0
        assert math.isclose(entry["loss"], entry["task_loss"] + 3.0 * entry["replay_kl"], rel_tol=1e-4)
    assert not torch.equal(head_before, model.lm_head.weight.detach())
    # one replay batch per micro-batch: the 8 texts pack into 3 rows of <= 24 tokens, an epoch is 2 optimizer
    # steps of 2 + 1 micro-batches, 4 steps are 2 epochs
    assert len(trainer.train_dataset) == 3 and trainer.replay_position == 2 * 3


def test_config_parses_from_yaml_and_argv(tmp_path):
    config_file = tmp_path / "sft.yaml"
    config_file.write_text(f"output_dir: {tmp_path / 'run'}\nreplay_buffer_path: replay/\nreplay_weight: 4.0\n"
                           "replay_batch_size: 2\nreplay_mode: topk\nuse_cpu: true\nreport_to: []\n")
    parser = TrlParser((sf.ReplaySFTConfig,))
    (config,) = parser.parse_args_and_config(args=["--config", str(config_file)])
    assert isinstance(config, SFTConfig)
    assert (config.replay_buffer_path, config.replay_weight, config.replay_batch_size, config.replay_mode,
            config.replay_seed, config.replay_temperature) == ("replay/", 4.0, 2, "topk", 0, 1.0)
    parser = TrlParser((sf.ReplaySFTConfig,))  # a fresh one: a --config file sets the parser's defaults
    (config,) = parser.parse_args_and_config(args=["--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
                                                   "--replay_buffer_path", "r/", "--replay_weight", "2.5",
                                                   "--replay_temperature", "0.5", "--replay_seed", "3"])
    assert (config.replay_buffer_path, config.replay_weight, config.replay_batch_size, config.replay_temperature,
            config.replay_seed) == ("r/", 2.5, None, 0.5, 3)
    with pytest.raises(ValueError, match="replay_weight"):
        parser.parse_args_and_config(args=["--output_dir", str(tmp_path), "--use_cpu", "true", "--replay_weight", "-1"])
    with pytest.raises(SystemExit):  # argparse's one-line error for a mode outside the choices
        parser.parse_args_and_config(args=["--output_dir", str(tmp_path), "--replay_mode", "dense"])


def test_bad_input(tmp_path, buffer_dir):
    data = Dataset.from_list(rows("text"))
    with pytest.raises(TypeError, match="ReplaySFTConfig"):
        sf.ReplaySFTTrainer(tiny_model(), SFTConfig(**_fields(tmp_path)), train_dataset=data,
                            processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match="replay_buffer_path"):
        sf.ReplaySFTTrainer(tiny_model(), sf.ReplaySFTConfig(**_fields(tmp_path)), train_dataset=data,
                            processing_class=tiny_tokenizer())
    for bad, match in (({"loss_type": "dft"}, "loss_type"), ({"label_smoothing_factor": 0.1}, "label_smoothing")):
        with pytest.raises(ValueError, match=match):
            sf.ReplaySFTTrainer(tiny_model(), sf.ReplaySFTConfig(**_fields(tmp_path, **bad),
                                                                 replay_buffer_path=buffer_dir),
                                train_dataset=data, processing_class=tiny_tokenizer())
    for bad, match in (({"replay_batch_size": 0}, "replay_batch_size"), ({"replay_mode": "dense"}, "replay_mode"),
                       ({"replay_temperature": 0.0}, "temperature")):
        with pytest.raises(ValueError, match=match):
            sf.ReplaySFTConfig(**_fields(tmp_path), **bad)
    with pytest.raises(ValueError, match="vocabulary"):  # a buffer of another model's vocabulary
        sf.ReplaySFTTrainer(tiny_model(vocab_size=64), sf.ReplaySFTConfig(**_fields(tmp_path),
                                                                          replay_buffer_path=buffer_dir),
                            train_dataset=data, processing_class=tiny_tokenizer())


@pytest.mark.parametrize("with_replay", [False, True])
def test_forgetting_callback_logs_on_a_trl_run(with_replay, tmp_path, buffer_dir):
    held_out = sf.ReplayBuffer.load(buffer_dir)
    model = tiny_model(seed=1)  # the original model: the drift starts at 0 and grows with training
    fields = _fields(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, logging_steps=2,
                     per_device_eval_batch_size=3, learning_rate=0.05)
    data = dict(train_dataset=Dataset.from_list(rows("text")), eval_dataset=Dataset.from_list(rows("text", 3, seed=1)),
                processing_class=tiny_tokenizer())
    if with_replay:
        trainer = sf.ReplaySFTTrainer(model, sf.ReplaySFTConfig(**fields, replay_buffer_path=buffer_dir,
                                                                replay_weight=1.0, replay_batch_size=2), **data)
    else:
        trainer = SFTTrainer(model, SFTConfig(**fields), **data)
    callback = sf.ForgettingCallback(trainer, held_out)
    trainer.add_callback(callback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_replay_kl" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert 0 < logged[0]["eval_replay_kl"] < logged[1]["eval_replay_kl"]
    final = sf.measure_forgetting(model, held_out, batch_size=3, progress=False)
    assert final.as_dict("eval_") == {k: logged[1][k] for k in final.as_dict("eval_")}
    assert any("replay_kl" in entry for entry in trainer.state.log_history if "loss" in entry) == with_replay


def test_resumed_sft_training_continues_the_replay_stream(tmp_path, buffer_dir):
    """Stopped after the checkpoint at step 2 and resumed: the parameters of 4 uninterrupted steps."""
    from transformers import TrainerCallback

    def run(out, stop_at=None, resume=False):
        class Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if stop_at is not None and state.global_step == stop_at:
                    control.should_training_stop = True

        model = tiny_model(seed=4)
        trainer = _replay_trainer(out, "messages_assistant_only", buffer_dir, model=model, replay_weight=2.0,
                                  max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=2)
        trainer.add_callback(Stop())
        trainer.train(resume_from_checkpoint=True if resume else None)
        return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}

    straight, expected = run(tmp_path / "a")
    stopped, _ = run(tmp_path / "b", stop_at=2)
    assert stopped.replay_position == 2 and (tmp_path / "b" / "out" / "checkpoint-2" / "replay_state.json").exists()
    resumed, got = run(tmp_path / "b", resume=True)
    assert resumed.state.global_step == 4 and resumed.replay_position == straight.replay_position == 4
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("form_name", ["prompt_completion", "packing_bfd"])
def test_evaluation_loss_equals_plain_sft_trainer_without_full_logits(form_name, tmp_path, buffer_dir, monkeypatch):
    form, form_fields = FORMS[form_name]
    eval_data = Dataset.from_list(rows(form, 5, seed=2))
    ours = sf.ReplaySFTTrainer(tiny_model(seed=4), sf.ReplaySFTConfig(**_fields(tmp_path / "ours", **form_fields),
                                                                      per_device_eval_batch_size=2,
                                                                      replay_buffer_path=buffer_dir),
                               train_dataset=Dataset.from_list(rows(form)), eval_dataset=eval_data,
                               processing_class=tiny_tokenizer())
    plain = SFTTrainer(tiny_model(seed=4), SFTConfig(**_fields(tmp_path / "plain", **form_fields),
                                                     per_device_eval_batch_size=2),
                       train_dataset=Dataset.from_list(rows(form)), eval_dataset=eval_data,
                       processing_class=tiny_tokenizer())
    expected = plain.evaluate()["eval_loss"]
    _refuse_full_logits(ours.model, monkeypatch)
    calls = []
    fused = ours._task_nll
    monkeypatch.setattr(ours, "_task_nll", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs))
    got = ours.evaluate()["eval_loss"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert len(calls) == len(ours.get_eval_dataloader()) > 0  # every batch through the fused task loss
