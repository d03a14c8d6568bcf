"""ReplayTrainer and ReplaySFTTrainer under FSDP2 through the Trainer (accelerate's fully_shard), 2 gloo ranks on
the CPU, equal one process over the union of the ranks' batches; and under bf16 autocast and resumed from an FSDP2
checkpoint (AdamW state included), equal the uninterrupted single process.

``fsdp="full_shard"`` with ``fsdp_config={"fsdp_version": 2, ...}``: accelerate shards every decoder layer, the
embeddings, the [final norm, lm_head] tail and the root (``fsdp2_prepare_model``). accelerate turns FSDP on only
for accelerator devices (its state leaves a CPU run at MULTI_CPU), so the ranks here lift that one guard
(``_fsdp_on_the_cpu``): everything else is accelerate's and Trainer's own FSDP2 path. The data is dealt as in
test_trainer_ddp.py (sequential sampling: the ranks' batches of 2 make the single-process batch of 4, the replay
stream split the same way), with uneven lengths, so only the global token normalization makes the update
exact. Two SGD steps (lr 1, no clipping, no weight decay) must move every parameter (gathered with
``full_tensor()``) as the single process does, to a relative error of 1e-5, with the same logged losses.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the spawned ranks included)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import selfreplay_fast as sf

from dist_utils import init_gloo, spawn
from replay_cases import rel_err
from test_trainer_ddp import _SEQUENTIAL, _free_port
from test_training import make_trainer, sequences, tiny_model

WORLD = 2
TOL = 1e-5
STEPS = 2
FSDP2 = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
SGD = dict(max_steps=STEPS, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
           weight_decay=0.0, warmup_steps=0, logging_steps=1, dataloader_num_workers=0, **_SEQUENTIAL)

# name: (trainer kind, per-device batch, gradient accumulation, extra arguments). Each run on 2 ranks equals one
# process with batches of 4 and no accumulation.
CONFIGS = {
    "full": ("replay", 2, 1, {}),
    "accumulation_checkpointing": ("replay", 1, 2, {"average_tokens_across_devices": False,
                                                    "gradient_checkpointing": True,
                                                    "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
    "lora": ("lora", 2, 1, {}),
    "tied": ("tied", 2, 1, {}),
    "sft": ("sft", 2, 1, {}),
    "sft_lora": ("sft_lora", 2, 1, {}),
}


def _fsdp_on_the_cpu():
    """accelerate's AcceleratorState enables FSDP for accelerator devices only; on CPU ranks it stays MULTI_CPU
    and ignores the plugin. Lift that guard (what the state sets on a GPU), nothing else. Every later
    ``AcceleratorState()`` copies the process state's MULTI_CPU back in, so the lift is reapplied there too."""
    from accelerate import state
    from accelerate.utils import DistributedType

    original = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = init


def _model(kind):
    if kind == "tied":
        return tiny_model(seed=3, tie_word_embeddings=True)
    model = tiny_model(seed=3)
    if kind in ("lora", "sft_lora"):
        import peft

        torch.manual_seed(11)  # the same LoRA initialization in every run
        model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights="gaussian"))
    return model


def _full(tensor):
    tensor = tensor.detach()
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _train(out_dir, replay_dir, kind, batch, accumulation, **over):
    """Trains STEPS SGD steps; returns ({name: before - after} of the trained parameters, the loss logs, trainer)."""
    model = _model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffer = sf.ReplayBuffer.load(replay_dir)
    if kind.startswith("sft"):
        from datasets import Dataset
        from trl_data import rows, tiny_tokenizer

        config = sf.ReplaySFTConfig(str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                                    use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, bf16=False,
                                    replay_weight=2.0, replay_batch_size=batch, seed=0, **SGD, **over)
        trainer = sf.ReplaySFTTrainer(model, config, train_dataset=Dataset.from_list(rows("text", 8)),
                                      processing_class=tiny_tokenizer(), replay_buffer=buffer)
    else:
        trainer = make_trainer(out_dir, model, buffer, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation, replay_batch_size=batch, **SGD, **over)
    if not _SEQUENTIAL:  # transformers 4.x has no train_sampling_strategy
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    logs = [{k: e[k] for k in ("loss", "task_loss", "replay_kl")} for e in trainer.state.log_history if "loss" in e]
    after = {n: _full(p) for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {n: before[n] - after[n] for n in before}, logs, trainer


def _worker(rank, world, init_file, out_dir, replay_dir, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_gloo(rank, world, init_file)
    _fsdp_on_the_cpu()
    from pathlib import Path

    infos, updates = {}, {}
    for name, (kind, batch, accumulation, over) in CONFIGS.items():
        update, logs, trainer = _train(Path(out_dir) / f"{name}-{rank}", replay_dir, kind, batch, accumulation,
                                       ddp_backend="gloo", **FSDP2, **over)
        sharded = [n for n, p in trainer.model.named_parameters() if type(p).__name__ == "DTensor"]
        infos[name] = {"fsdp2": trainer.accelerator.is_fsdp2, "wrapped": type(trainer.model_wrapped).__name__,
                       "sharded": len(sharded), "logs": logs}
        updates[name] = update
    torch.save(updates, os.path.join(out_dir, f"rank{rank}.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(infos, f)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory):
    """A tail-mode buffer of 8 sequences of uneven lengths, recorded from another tiny Llama."""
    out = tmp_path_factory.mktemp("replay") / "buffer"
    with torch.inference_mode():
        sf.build_teacher_cache(tiny_model(seed=1).eval(), sequences(5, [7, 12, 9, 4, 11, 8, 10, 6]), 4, str(out),
                               progress=False)
    return str(out)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, replay_dir):
    out = tmp_path_factory.mktemp("fsdp")
    spawn(_worker, WORLD, out, replay_dir, _free_port())
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return infos, [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_trainer_equals_one_process_over_the_union(name, fsdp_runs, replay_dir, tmp_path):
    infos, updates = fsdp_runs
    kind, _, _, over = CONFIGS[name]
    single = {k: v for k, v in over.items() if k != "average_tokens_across_devices"}
    expected, expected_logs, _ = _train(tmp_path / "one", replay_dir, kind, 4, 1, **single)  # batches of 4
    for n, u in expected.items():
        assert u.abs().max() > 0, f"{n}: no update"
    for r in range(WORLD):
        info = infos[r][name]
        assert info["fsdp2"] and info["wrapped"].startswith("FSDP") and info["sharded"] > 0
        assert updates[r][name].keys() == expected.keys()
        err, param = max((rel_err(updates[r][name][n], expected[n]), n) for n in expected)
        assert err <= TOL, f"{name} rank {r}: update of {param} off by {err:.2e}"
        for got, want in zip(info["logs"], expected_logs, strict=True):
            assert got == pytest.approx(want, rel=1e-4)


# -- bf16 autocast and resume-from-checkpoint under FSDP2 --------------------------------------------------

BF16_TOL = 1.5e-2  # bf16 matmuls over batches of 2 (ranks) against batches of 4 (one process) round differently
ADAMW = dict(SGD, optim="adamw_torch", learning_rate=1e-2, adam_epsilon=1e-6)  # optimizer state to save and restore


def _stop_at(step):
    from transformers import TrainerCallback

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return Stop()


def _train_in_steps(out_dir, replay_dir, *, stop_at=None, resume=False, **over):
    """ReplayTrainer, batches of 2 (ranks) or 4 (one process), AdamW, a checkpoint every step; stopped after
    ``stop_at`` or resumed from the last checkpoint. Returns ({name: before - after}, loss logs, trainer)."""
    model = _model("replay")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(out_dir, model, sf.ReplayBuffer.load(replay_dir), replay_batch_size=over.pop("batch"),
                           per_device_train_batch_size=over.pop("per_device"),
                           callbacks=[_stop_at(stop_at)] if stop_at else [], save_strategy="steps", save_steps=1,
                           **dict(ADAMW, **over))
    if not _SEQUENTIAL:
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train(resume_from_checkpoint=True if resume else None)
    logs = [{k: e[k] for k in ("loss", "task_loss", "replay_kl")} for e in trainer.state.log_history if "loss" in e]
    after = {n: _full(p) for n, p in trainer.model.named_parameters()}
    return {n: before[n] - after[n] for n in before}, logs, trainer


def _worker_bf16_resume(rank, world, init_file, out_dir, replay_dir, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_gloo(rank, world, init_file)
    _fsdp_on_the_cpu()
    from pathlib import Path

    out = Path(out_dir)
    results = {}
    # bf16 autocast: the base model's layers run under CPU autocast in bf16, as in one process
    seen = []
    spy = lambda module, args: seen.append(torch.is_autocast_enabled("cpu")  # noqa: E731
                                           and torch.get_autocast_dtype("cpu") == torch.bfloat16)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: spy(module, args) if type(module).__name__.endswith("LlamaDecoderLayer") else None)  # FSDP2 renames the class
    try:
        update, logs, _ = _train(out / f"bf16-{rank}", replay_dir, "replay", 2, 1, ddp_backend="gloo", bf16=True,
                                 **FSDP2)
    finally:
        hook.remove()
    results["bf16"] = (update, logs, seen)
    # resume: stopped after the checkpoint of step 1 (all ranks write one checkpoint directory), then resumed
    shared = out / "resume"
    _train_in_steps(shared, replay_dir, stop_at=1, batch=2, per_device=2, ddp_backend="gloo", **FSDP2)
    update, logs, trainer = _train_in_steps(shared, replay_dir, resume=True, batch=2, per_device=2,
                                            ddp_backend="gloo", **FSDP2)
    results["resume"] = (update, logs, trainer.state.global_step, trainer.replay_position)
    torch.save(results, out / f"extra-rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp_bf16_resume_runs(tmp_path_factory, replay_dir):
    out = tmp_path_factory.mktemp("fsdp-extra")
    spawn(_worker_bf16_resume, WORLD, out, replay_dir, _free_port())
    return [torch.load(out / f"extra-rank{r}.pt") for r in range(WORLD)]


def test_fsdp2_bf16_autocast_equals_one_process(fsdp_bf16_resume_runs, replay_dir, tmp_path):
    expected, expected_logs, _ = _train(tmp_path / "one", replay_dir, "replay", 4, 1, bf16=True)
    fp32, _, _ = _train(tmp_path / "fp32", replay_dir, "replay", 4, 1)
    # the bf16 run is not the fp32 run: the test would not see autocast missing
    bf16_vs_fp32 = max(rel_err(expected[n], fp32[n]) for n in expected)
    assert bf16_vs_fp32 > BF16_TOL
    for r, results in enumerate(fsdp_bf16_resume_runs):
        update, logs, autocast_seen = results["bf16"]
        assert autocast_seen and all(autocast_seen), f"rank {r}: a decoder layer ran outside bf16 autocast"
        err, param = max((rel_err(update[n], expected[n]), n) for n in expected)
        print(f"rank {r}: bf16 FSDP2 vs one process {err:.2e} (bf16 vs fp32, one process: {bf16_vs_fp32:.2e})")
        assert err <= BF16_TOL, f"rank {r}: update of {param} off by {err:.2e}"
        for got, want in zip(logs, expected_logs, strict=True):
            assert got == pytest.approx(want, rel=BF16_TOL)


def test_fsdp2_resume_from_checkpoint_equals_uninterrupted_one_process(fsdp_bf16_resume_runs, replay_dir, tmp_path):
    expected, expected_logs, straight = _train_in_steps(tmp_path / "one", replay_dir, batch=4, per_device=4)
    for r, results in enumerate(fsdp_bf16_resume_runs):
        update, logs, step, position = results["resume"]
        # positions count batches of the single-process stream of replay batches of 2: two per step on 2 ranks
        assert step == STEPS and straight.replay_position == STEPS and position == WORLD * STEPS
        err, param = max((rel_err(update[n], expected[n]), n) for n in expected)
        assert err <= TOL, f"rank {r}: update of {param} off by {err:.2e}"
        # the resumed run logs step 2 only; its losses are the uninterrupted run's
        assert logs[-1] == pytest.approx(expected_logs[-1], rel=1e-4)


class _Accelerator:
    def __init__(self, distributed_type, is_fsdp2):
        self.distributed_type = type("Type", (), {"name": distributed_type})()
        self.is_fsdp2 = is_fsdp2


class _Args:
    n_gpu = 1


def _parallelism_error(**state):
    """The refusal ReplayTrainerMixin._check_parallelism gives a trainer in that state (None: accepted)."""
    from selfreplay_fast.replay_trainer_core import ReplayTrainerMixin

    trainer = object.__new__(type("StubTrainer", (ReplayTrainerMixin,), {}))  # no Trainer behind it
    trainer.args = _Args()
    trainer.accelerator = _Accelerator(state.pop("distributed_type"), state.pop("is_fsdp2", False))
    trainer.__dict__.update(state)
    try:
        trainer._check_parallelism()
    except NotImplementedError as error:
        return str(error)
    return None


def test_deepspeed_and_fsdp1_are_refused_naming_the_fsdp2_settings():
    # accepted: one process, DDP, FSDP2
    assert _parallelism_error(distributed_type="NO") is None
    assert _parallelism_error(distributed_type="MULTI_GPU") is None
    assert _parallelism_error(distributed_type="FSDP", is_fsdp_enabled=True, is_fsdp2=True) is None
    deepspeed = _parallelism_error(distributed_type="DEEPSPEED", is_deepspeed_enabled=True)
    fsdp1 = _parallelism_error(distributed_type="FSDP", is_fsdp_enabled=True, is_fsdp2=False)
    for message in (deepspeed, fsdp1):
        assert "fsdp='full_shard'" in message and "'fsdp_version': 2" in message
    assert "DeepSpeed" in deepspeed and "FSDP version 1" in fsdp1
    assert "XLA" in _parallelism_error(distributed_type="XLA")
