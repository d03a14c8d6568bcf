"""One cell of ``sf.audit``'s grid: a short pilot fine-tune of the original model on the task, then its
target-task loss on held-out task text and its drift on held-out replay.

Every cell starts from the same original weights, sees the same task batches in the same order and (with
replay) the same replay batches: the cells differ only in their learning rate and replay weight, so their
differences are the trade-off the audit shows and not sampling noise of the pilots.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from typing import Callable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .forgetting import measure_forgetting
from .model_glue import ReplayKLLoss, replay_step, task_nll


@dataclasses.dataclass
class PilotSettings:
    """What every pilot of one audit shares (see ``sf.audit`` for the meaning of each)."""

    steps: int
    batch_size: int
    replay_batch_size: int
    lora: bool
    lora_rank: int
    seed: int
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    eval_batch_size: int = 16


@dataclasses.dataclass
class CellResult:
    """One pilot: ``task_loss`` (nats per token on held-out task text) and ``drift`` (``replay_kl`` of
    ``measure_forgetting`` on held-out replay, nats per token) with its standard error."""

    learning_rate: float
    replay_weight: float
    replay_loss: str
    task_loss: float
    drift: float
    drift_stderr: float
    replay_nll: float
    seconds: float
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def plain(self) -> bool:
        return self.replay_weight == 0

    def key(self) -> str:
        return cell_key(self.learning_rate, self.replay_weight, self.replay_loss)


def cell_key(learning_rate: float, replay_weight: float, replay_loss: str = "kl") -> str:
    """A file-name-safe name of a cell: the same numbers give the same name on every run."""
    loss = "" if replay_weight == 0 or replay_loss == "kl" else "_" + replay_loss.replace("+", "-")
    return f"lr{learning_rate:.6e}_w{replay_weight:.6e}{loss}"


def save_cell(directory: str, cell: CellResult) -> str:
    """Write the cell's JSON atomically (a crash leaves the old file or none, never half of one)."""
    path = os.path.join(directory, cell.key() + ".json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(cell), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_cell(directory: str, learning_rate: float, replay_weight: float, replay_loss: str) -> Optional[CellResult]:
    path = os.path.join(directory, cell_key(learning_rate, replay_weight, replay_loss) + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return CellResult(**json.load(f))


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, device) -> dict:
    """A task batch: right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on the padding)."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
    ids, attention = ids.to(device), attention.to(device)
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}


@torch.no_grad()
def task_loss(model, seqs: List[List[int]], pad_id: int, device, batch_size: int = 16) -> float:
    """Mean next-token NLL per counted token of ``model`` on ``seqs`` (eval mode, no full logits)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(seqs), batch_size):
            b = pad_sequences(seqs[i : i + batch_size], pad_id, device)
            total += float(task_nll(model, b["input_ids"], b["attention_mask"], b["labels"], reduction="sum"))
            count += int((b["labels"][:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:  # pragma: no cover - peft is in the test extra
        raise ImportError("lora=True needs peft: pip install peft") from None
    # all-linear leaves the lm_head out (the fused losses refuse a LoRA-adapted head); no dropout: pilots
    # must be deterministic under the seed.
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    return get_peft_model(model, config)


def _replay_batches(replay, batch_size: int, seed: int, device):
    epoch = 0
    while True:
        for batch in replay.batches(batch_size, shuffle=True, seed=seed + epoch, device=device):
            yield batch
        epoch += 1


def run_pilot(original, *, train_task: List[List[int]], heldout_task: List[List[int]], replay_train, replay_heldout,
              learning_rate: float, replay_weight: float, replay_loss: str, settings: PilotSettings, pad_id: int,
              device, progress: bool = True, extra_eval: Optional[Callable] = None, desc: str = "pilot") -> CellResult:
    """Fine-tune a copy of ``original`` for ``settings.steps`` steps and measure it (``original`` is not touched)."""
    import time

    start = time.perf_counter()
    torch.manual_seed(settings.seed)  # LoRA's initialization
    model = copy.deepcopy(original)
    if settings.lora:
        model = _with_lora(model, settings.lora_rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warmup = max(1, round(settings.warmup_fraction * settings.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    task_order = torch.Generator().manual_seed(settings.seed)  # the same task batches in every cell
    loss_fn = ReplayKLLoss(mode=replay_train.mode, loss=replay_loss) if replay_weight > 0 else None
    replay_iter = _replay_batches(replay_train, settings.replay_batch_size, settings.seed, device) if loss_fn else None
    with tqdm(total=settings.steps, desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for _ in range(settings.steps):
            picks = torch.randint(len(train_task), (settings.batch_size,), generator=task_order).tolist()
            batch = pad_sequences([train_task[i] for i in picks], pad_id, device)
            if loss_fn is None:
                loss = task_nll(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
            else:
                loss = replay_step(model, batch, next(replay_iter), replay_weight, replay_loss=loss_fn).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
    model.eval()
    heldout_loss = task_loss(model, heldout_task, pad_id, device, settings.eval_batch_size)
    report = measure_forgetting(model, replay_heldout, batch_size=settings.eval_batch_size, device=device,
                                progress=False)
    extra = dict(extra_eval(model)) if extra_eval is not None else {}
    return CellResult(learning_rate=learning_rate, replay_weight=replay_weight,
                      replay_loss=replay_loss if replay_weight > 0 else "none", task_loss=heldout_loss,
                      drift=report.replay_kl.value, drift_stderr=report.replay_kl.stderr,
                      replay_nll=report.replay_nll.value, seconds=time.perf_counter() - start, extra=extra)
