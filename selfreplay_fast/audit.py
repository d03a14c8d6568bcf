"""``sf.audit``: before a long fine-tune, will self-generated replay save this model from forgetting this task?

Short pilot fine-tunes of the original model on a slice of the task data, over a grid of learning rates x
replay weights (0 included), each measured by its target-task loss on held-out task text and its drift from
the original model (``measure_forgetting`` on held-out replay, which needs no copy of the original). The
verdict (the rule is in ``audit_report``) names the learning rate and replay weight where replay removes
most of the drift at little task cost, or warns that the drift cannot be removed without a large task cost:
the capacity-bound regime, where the model has to forget to learn.

Everything goes under ``out_dir``, which the audit owns: ``settings.json`` (what the cells were run with),
``cells/`` (one JSON per finished cell, written atomically: a rerun skips them), ``replay/`` (the replay
generated from the model when none is given; resumable itself), ``audit.json``, ``audit_table.md`` and
``audit_tradeoff.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from typing import Callable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .audit_pilot import CellResult, PilotSettings, load_cell, run_pilot, save_cell, task_loss
from .audit_report import Verdict, format_table, plot_tradeoff, verdict
from .model_glue import REPLAY_LOSSES

__all__ = ["audit", "AuditResult", "load_task_sequences"]

DEFAULT_LEARNING_RATES = {False: (1e-5, 3e-5, 1e-4), True: (1e-4, 3e-4, 1e-3)}  # full fine-tuning, LoRA
DEFAULT_REPLAY_WEIGHTS = (0.0, 1.0, 3.0, 10.0)


@dataclasses.dataclass
class AuditResult:
    cells: List[CellResult]
    verdict: Verdict
    before_task_loss: float
    settings: dict
    table: str
    json_path: str
    plot_path: Optional[str]

    def cell(self, learning_rate: float, replay_weight: float) -> CellResult:
        return next(c for c in self.cells if c.learning_rate == learning_rate and c.replay_weight == replay_weight)


def load_task_sequences(task, tokenizer=None, *, max_length: int) -> List[List[int]]:
    """Token-id lists from ``task``: a ``.jsonl`` path (each line ``{"text": ...}``, tokenized with
    ``tokenizer``, or ``{"input_ids": [...]}``), or a list of strings or of token-id lists. Sequences are cut
    to ``max_length`` tokens; those shorter than 2 tokens (nothing to predict) are dropped."""
    if isinstance(task, (str, os.PathLike)):
        rows = []
        with open(task, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"task: {task}:{number} is not JSON ({exc.msg})") from None
                if not isinstance(row, dict) or not ({"text", "input_ids"} & row.keys()):
                    raise ValueError(f"task: {task}:{number} has neither a 'text' nor an 'input_ids' field")
                rows.append(row["input_ids"] if "input_ids" in row else row["text"])
    elif isinstance(task, Sequence):
        rows = list(task)
    else:
        raise TypeError(f"task must be a .jsonl path or a list of texts or token-id lists, got {type(task).__name__}")
    seqs = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if tokenizer is None:
                raise ValueError("task: text rows need a tokenizer (the model directory has none); give input_ids")
            row = tokenizer(row)["input_ids"]
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in row):
            raise ValueError(f"task: row {i} is not a list of token ids")
        row = [int(t) for t in row][:max_length]
        if len(row) >= 2:
            seqs.append(row)
    if len(seqs) < 2:
        raise ValueError(f"task: expected at least 2 sequences of >= 2 tokens (one to train on, one held out), got {len(seqs)}")
    return seqs


def _check_grid(name, values, *, allow_zero: bool) -> List[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise ValueError(f"{name}: expected finite numbers {'>= 0' if allow_zero else '> 0'}, got {v!r}")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: values repeat in {values!r}")
    return sorted(out)


def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _fraction(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
    return float(value)


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch device, got {device!r}") from None


def _digest(seqs: List[List[int]]) -> str:
    h = hashlib.sha256()
    for s in seqs:
        h.update(torch.tensor(s, dtype=torch.int64).numpy().tobytes() + b"|")
    return h.hexdigest()


def _atomic_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _check_settings(out_dir: str, settings: dict) -> None:
    """Cells from another model, task, replay or pilot setting must never mix with this run's."""
    path = os.path.join(out_dir, "settings.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            raise ValueError(f"out_dir: {out_dir} holds an audit run with other settings ({', '.join(differ)} differ): "
                             "use another out_dir, or delete it to start over")
    else:
        _atomic_json(path, settings)


def _load_model(model, device, dtype):
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model)
        except (OSError, ValueError, KeyError, TypeError):  # a model directory without a tokenizer
            tokenizer = None
        return loaded.to(device), tokenizer
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a model directory or a Hugging Face causal LM, got {type(model).__name__}")
    return model, None


def _replay_buffer(replay, original, out_dir, *, sequences, max_new_tokens, top_k, seed, progress, tokenizer):
    from .generation import generate_replay
    from .replay_buffer import ReplayBuffer

    if replay is None:  # generated from the model itself, prompted with BOS alone, into the audit's own cache
        return generate_replay(original, num_sequences=sequences, max_new_tokens=max_new_tokens, top_k=top_k,
                               batch_size=min(64, sequences), seed=seed, out_dir=os.path.join(out_dir, "replay"),
                               progress=progress, tokenizer=tokenizer)
    if isinstance(replay, (str, os.PathLike)):
        return ReplayBuffer.load(os.fspath(replay))
    if not isinstance(replay, ReplayBuffer):
        raise TypeError(f"replay must be None, a replay buffer directory or a ReplayBuffer, got {type(replay).__name__}")
    return replay


def audit(model, task, *, out_dir: str, replay=None, lora: bool = False, lora_rank: int = 8,
          learning_rates: Optional[Sequence[float]] = None, replay_weights: Sequence[float] = DEFAULT_REPLAY_WEIGHTS,
          replay_loss: str = "kl", steps: int = 100, batch_size: int = 8, replay_batch_size: Optional[int] = None,
          task_holdout: float = 0.2, replay_holdout: float = 0.25, replay_sequences: int = 256,
          replay_max_new_tokens: int = 128, replay_top_k: int = 32, max_length: int = 512,
          max_task_cost: float = 0.01, min_drift_removed: float = 0.8, seed: int = 0, device="auto",
          dtype=torch.float32, progress: bool = True, extra_eval: Optional[Callable] = None,
          heldout_task=None) -> AuditResult:
    """Pilot fine-tunes over ``learning_rates`` x ``replay_weights`` and the verdict of the audit's rule.

    Args:
        model: a model directory or a Hugging Face causal LM (never modified: every pilot trains a copy).
        task: the task data (see :func:`load_task_sequences`); ``task_holdout`` of it (shuffled under ``seed``)
            is held out for the target-task loss, the rest is trained on.
        out_dir: the audit's own directory (resumable: a rerun with the same settings skips finished cells,
            and a grid widened later reuses them).
        replay: None (generate ``replay_sequences`` from the model, BOS prompts, ``replay_top_k`` teacher slots,
            into ``out_dir/replay``), a replay buffer directory or a ``ReplayBuffer``. ``ReplayBuffer.split``
            holds ``replay_holdout`` of it out (seed ``seed``) to measure the drift on; the rest is replayed.
        lora / lora_rank: pilots with LoRA adapters on every linear layer but the lm_head (peft), as the
            user will run the fine-tune; otherwise full fine-tuning.
        learning_rates: default 1e-5, 3e-5, 1e-4 (full) or 1e-4, 3e-4, 1e-3 (LoRA).
        replay_weights: lambda of each cell; must include 0 (the plain runs). replay_loss: "kl", "nll", "kl+nll".
        steps / batch_size / replay_batch_size: optimizer steps of each pilot, task sequences per step and replay
            sequences per step (default: half the task batch, as in the paper).
        max_task_cost / min_drift_removed: the verdict's thresholds (see ``audit_report``).
        seed: the split, the task and replay batch order, the LoRA initialization and the generated replay.
        device: "auto" (cuda if there is one), "cpu", "cuda", ...; dtype: the weights' dtype when loading.
        extra_eval: optional ``fn(model) -> dict`` of further numbers recorded with each cell.
        heldout_task: optional held-out task data of its own (as ``task``): then all of ``task`` is trained on
            and ``task_holdout`` is not used.
    """
    device = resolve_device(device)
    if not isinstance(lora, bool):
        raise TypeError(f"lora must be True or False, got {lora!r}")
    if replay_loss not in REPLAY_LOSSES:
        raise ValueError(f"replay_loss must be one of {', '.join(map(repr, REPLAY_LOSSES))}, got {replay_loss!r}")
    learning_rates = _check_grid("learning_rates", DEFAULT_LEARNING_RATES[lora] if learning_rates is None
                                 else learning_rates, allow_zero=False)
    replay_weights = _check_grid("replay_weights", replay_weights, allow_zero=True)
    if replay_weights[0] != 0:
        raise ValueError(f"replay_weights must include 0 (the plain runs the verdict compares with), got {replay_weights}")
    steps, batch_size, lora_rank = (_positive_int(n, v) for n, v in
                                    (("steps", steps), ("batch_size", batch_size), ("lora_rank", lora_rank)))
    replay_batch_size = max(1, batch_size // 2) if replay_batch_size is None else _positive_int("replay_batch_size",
                                                                                                replay_batch_size)
    for name, value in (("replay_sequences", replay_sequences), ("replay_max_new_tokens", replay_max_new_tokens),
                        ("replay_top_k", replay_top_k), ("max_length", max_length)):
        _positive_int(name, value)
    task_holdout, replay_holdout = _fraction("task_holdout", task_holdout), _fraction("replay_holdout", replay_holdout)
    if isinstance(max_task_cost, bool) or not isinstance(max_task_cost, numbers.Real) or not max_task_cost >= 0:
        raise ValueError(f"max_task_cost must be a number >= 0 (a fraction of the task loss), got {max_task_cost!r}")
    _fraction("min_drift_removed", min_drift_removed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"out_dir must be a directory path, got {out_dir!r}")
    out_dir = os.fspath(out_dir)

    from .dir_lock import DirectoryLock
    from .fingerprint import weights_fingerprint

    original, tokenizer = _load_model(model, device, dtype)
    original.eval()
    seqs = load_task_sequences(task, tokenizer, max_length=max_length)
    if heldout_task is None:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed)).tolist()
        n_held = min(max(1, round(task_holdout * len(seqs))), len(seqs) - 1)
        heldout_task = [seqs[i] for i in sorted(order[:n_held])]
        train_task = [seqs[i] for i in sorted(order[n_held:])]
    else:
        train_task, heldout_task = seqs, load_task_sequences(heldout_task, tokenizer, max_length=max_length)
        n_held = len(heldout_task)
        seqs = seqs + heldout_task  # the digest covers both
    config = original.config
    pad_id = next((i for i in (config.pad_token_id, config.eos_token_id, 0) if isinstance(i, int)), 0)

    os.makedirs(os.path.join(out_dir, "cells"), exist_ok=True)
    with DirectoryLock(out_dir, purpose="audit"):
        buffer = _replay_buffer(replay, original, out_dir, sequences=replay_sequences,
                                max_new_tokens=replay_max_new_tokens, top_k=replay_top_k, seed=seed,
                                progress=progress, tokenizer=tokenizer)
        replay_train, replay_heldout = buffer.split(replay_holdout, seed=seed)
        pilot = PilotSettings(steps=steps, batch_size=batch_size, replay_batch_size=replay_batch_size, lora=lora,
                              lora_rank=lora_rank, seed=seed)
        settings = {"model_fingerprint": weights_fingerprint(original), "task_digest": _digest(seqs),
                    "replay_digest": _digest(buffer.sequences()), "replay_sequences_held_out": len(replay_heldout),
                    "task_held_out": n_held, "device": device.type,  # replay_loss is in each cell's name
                    "pilot": dataclasses.asdict(pilot)}
        _check_settings(out_dir, settings)
        before = task_loss(original, heldout_task, pad_id, device, pilot.eval_batch_size)
        grid = [(lr, w) for lr in learning_rates for w in replay_weights]
        cells = []
        with tqdm(total=len(grid), desc="audit cells", unit="cell", disable=not progress, dynamic_ncols=True) as bar:
            for lr, w in grid:
                cell = load_cell(os.path.join(out_dir, "cells"), lr, w, replay_loss)
                if cell is None:
                    cell = run_pilot(original, train_task=train_task, heldout_task=heldout_task,
                                     replay_train=replay_train, replay_heldout=replay_heldout, learning_rate=lr,
                                     replay_weight=w, replay_loss=replay_loss, settings=pilot, pad_id=pad_id,
                                     device=device, progress=progress, extra_eval=extra_eval,
                                     desc=f"lr {lr:g}, replay weight {w:g}")
                    save_cell(os.path.join(out_dir, "cells"), cell)
                cells.append(cell)
                bar.set_postfix(task=f"{cell.task_loss:.3f}", drift=f"{cell.drift:.4f}")
                bar.update()
        decision = verdict(cells, max_task_cost=max_task_cost, min_drift_removed=min_drift_removed)
        table = format_table(cells, decision, before_task_loss=before)
        plot_path = plot_tradeoff(cells, decision, os.path.join(out_dir, "audit_tradeoff.png"))
        json_path = os.path.join(out_dir, "audit.json")
        _atomic_json(json_path, {"settings": settings, "learning_rates": learning_rates,
                                 "replay_weights": replay_weights, "before_task_loss": before,
                                 "cells": [dataclasses.asdict(c) for c in cells],
                                 "verdict": dataclasses.asdict(decision)})
        with open(os.path.join(out_dir, "audit_table.md.tmp"), "w") as f:
            f.write(table + "\n")
        os.replace(os.path.join(out_dir, "audit_table.md.tmp"), os.path.join(out_dir, "audit_table.md"))
    return AuditResult(cells, decision, before, settings, table, json_path, plot_path)
