"""ReplayTrainer under DDP (accelerate, 2 gloo ranks on CPU) equals one process over the union of the batches.

Each rank sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, so TrainingArguments(ddp_backend="gloo",
use_cpu=True) trains distributed (accelerate wraps the model in DDP). The task data is read in order
(train_sampling_strategy="sequential"): accelerate's batch sampler hands step s's batches 2s and 2s + 1 of
2 sequences to ranks 0 and 1, i.e. the single-process batch s of 4. The replay stream is split the same way
(rank r keeps the batches r, r + 2, ... of the shuffled stream of 2-sequence batches), so the union of the
ranks' replay batches is the single-process replay batch of 4. The sequences have uneven lengths, so the
ranks count different numbers of tokens: only the global normalization makes the update exact. Two SGD
steps (lr 1, no clipping, no weight decay, constant schedule) must give every parameter's update of the
single-process run to a relative error of 1e-5 on both ranks, and the same logged losses.
"""

import inspect
import json
import os
import socket

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported anywhere (the spawned ranks included)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import selfreplay_fast as sf
from transformers import TrainingArguments

from dist_utils import init_gloo, spawn
from replay_cases import rel_err
from test_training import make_trainer, sequences, tiny_model

WORLD = 2
_SEQUENTIAL = ({"train_sampling_strategy": "sequential"}
               if "train_sampling_strategy" in inspect.signature(TrainingArguments.__init__).parameters else {})
TOL = 1e-5
STEPS = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out_dir, replay_dir, batch, accumulation, bypass=False, **over):
    """Trains STEPS SGD steps; returns ({name: before - after}, the logs with a loss, local counts seen)."""
    model = tiny_model(seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(out_dir, model, sf.ReplayBuffer.load(replay_dir), per_device_train_batch_size=batch,
                           gradient_accumulation_steps=accumulation, replay_batch_size=batch, max_steps=STEPS,
                           optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                           weight_decay=0.0, warmup_steps=0, logging_steps=1, dataloader_num_workers=0,
                           **_SEQUENTIAL, **over)
    if not _SEQUENTIAL:  # transformers 4.x has no train_sampling_strategy
        trainer._get_train_sampler = lambda *args, **kwargs: torch.utils.data.SequentialSampler(trainer.train_dataset)
    seen = []  # (task labels counted, replay positions) of each micro-batch on this rank
    original = trainer.compute_loss

    def spy(model, inputs, return_outputs=False, num_items_in_batch=None):
        replay = trainer._replay_window[0][0] if trainer._replay_window else None
        seen.append([int((inputs["labels"][:, 1:] != -100).sum()), int(replay["mask"].sum()),
                     replay["indices"].tolist(), inputs["input_ids"][:, 0].tolist()])
        if bypass:  # the old way: past the DDP wrapper, so the reducer never runs
            model = trainer.accelerator.unwrap_model(model)
        return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    trainer.compute_loss = spy
    trainer.train()
    logs = [{k: e[k] for k in ("loss", "task_loss", "replay_kl")} for e in trainer.state.log_history if "loss" in e]
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}, logs, seen, trainer


# (per-device batch, gradient accumulation, extra TrainingArguments) of the DDP runs. Both equal one process
# with batches of 4 and no accumulation. The second one: the ranks' micro-batches are 1 sequence each
# (accelerate deals the 1-sequence batches round robin: rank 0 gets sequences 0 and 2 of each step), and
# Trainer counts each rank's labels only (average_tokens_across_devices=False): ReplayTrainer all-reduces them.
CONFIGS = [(2, 1, {}), (1, 2, {"average_tokens_across_devices": False})]


def _worker(rank, world, init_file, out_dir, replay_dir, port, bypass):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_gloo(rank, world, init_file)  # accelerate finds the process group initialized
    from pathlib import Path

    infos, all_updates = [], []
    for i, (batch, accumulation, over) in enumerate(CONFIGS[:1] if bypass else CONFIGS):
        updates, logs, seen, trainer = _run(Path(out_dir) / f"run{i}-{rank}", replay_dir, batch, accumulation, bypass,
                                            ddp_backend="gloo", **over)
        infos.append({"world_size": trainer.args.world_size, "wrapped": type(trainer.model_wrapped).__name__,
                      "distributed_type": trainer.accelerator.distributed_type.name, "logs": logs, "seen": seen})
        all_updates.append(updates)
    torch.save(all_updates, os.path.join(out_dir, f"rank{rank}.pt"))
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


def _spawn(tmp_path, replay_dir, bypass=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    spawn(_worker, WORLD, tmp_path, replay_dir, _free_port(), bypass)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return ranks, [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _max_rel_err(got, expected):
    assert got.keys() == expected.keys()
    return max((rel_err(got[n], expected[n]), n) for n in expected)


def test_ddp_trainer_equals_one_process_over_the_union(tmp_path, replay_dir):
    ranks, updates = _spawn(tmp_path / "ddp", replay_dir)
    big, big_logs, big_seen, _ = _run(tmp_path / "one", replay_dir, 2 * 2, 1)
    for n, u in big.items():
        assert u.abs().max() > 0, f"{n}: no update"
    for c, (batch, accumulation, _) in enumerate(CONFIGS):
        infos = [ranks[r][c] for r in range(WORLD)]
        for info in infos:
            assert info["world_size"] == WORLD and info["distributed_type"] == "MULTI_CPU"
            assert info["wrapped"] == "DistributedDataParallel"
        # The ranks' task and replay batches make the single-process batches, with different local counts.
        for step in range(STEPS):
            parts = [info["seen"][step * accumulation:(step + 1) * accumulation] for info in infos]
            assert sum(p[0] for p in parts[0]) != sum(p[0] for p in parts[1])
            assert sum(p[1] for p in parts[0]) != sum(p[1] for p in parts[1])
            dealt = [parts[r][a] for a in range(accumulation) for r in range(WORLD)]  # round robin
            assert [sum(p[0] for p in dealt), sum(p[1] for p in dealt)] == big_seen[step][:2]
            assert sum((p[2] for p in dealt), []) == big_seen[step][2]  # replay sequence indices
            assert sum((p[3] for p in dealt), []) == big_seen[step][3]  # first token of each task sequence
        for r in range(WORLD):
            err, name = _max_rel_err(updates[r][c], big)
            assert err <= TOL, f"config {c} rank {r}: update of {name} off by {err:.2e}"
            for got, expected in zip(infos[r]["logs"], big_logs, strict=True):
                assert got == pytest.approx(expected, rel=1e-4)
