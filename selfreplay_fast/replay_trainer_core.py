"""The replay logic of ``ReplayTrainer`` (transformers) and ``ReplaySFTTrainer`` (TRL): ``ReplayTrainerMixin``.

Mixed into a ``transformers.Trainer`` subclass (``class T(ReplayTrainerMixin, Trainer)``), it replaces the
training loss, the loss-only evaluation step, checkpointing of the replay stream and the replay logs.

Every training micro-batch costs the task NLL plus ``replay_weight`` times the KL to the cached teacher
on one replay batch, both through ``fused_replay_kl`` (model_glue.py): the lm_head is never called, so
no [tokens, V] logits exist in a training step. The replay batches cycle through the buffer, reshuffled
every pass (seed ``replay_seed + pass``), and move to the training device.

Gradient accumulation: the Trainer prefetches the micro-batches of an optimizer step
(``get_batch_samples``); the replay batches of that step are drawn then too, so both terms are
normalized by the token counts of the whole window (the task by Trainer's ``num_items_in_batch`` when
it counts labels, the KL by the replay positions of the window). Accumulating n micro-batches is then
the same update as one batch n times larger. Without ``num_items_in_batch`` the task term is the
per-micro-batch mean divided by the number of micro-batches, as Trainer does.

Mixed precision: accelerate's autocast wraps the model's ``forward``, which is replaced during a training
step (only the base model runs), so the replacement enters ``accelerator.autocast()`` itself.

Logging: each training log (every ``logging_steps``) gets ``task_loss`` and ``replay_kl``, their means
over the optimizer steps since the previous log (``loss`` = ``task_loss + replay_weight * replay_kl``).

Data parallelism (DDP through accelerate, e.g. ``torchrun --nproc_per_node N``): the losses are computed
inside the forward of the module the Trainer wrapped. ``compute_loss`` sets the unwrapped model's instance
attribute ``forward`` to a function computing task NLL + replay KL (the base model and ``fused_replay_kl``,
never the lm_head's forward) and calls the wrapped model, so DDP's forward runs and its reducer all-reduces
the gradients in backward; ``forward`` is restored afterwards. The replay stream is split over the ranks:
rank r takes the batches r, r + N, r + 2N, ... of the one shuffled stream, so N ranks with replay batches of
B together replay what one process with batches of N * B would (within a pass). Both terms are normalized by
global token counts (see ``compute_loss``), so the update equals that of one process over the union of the
ranks' batches.

FSDP2 (accelerate's ``fully_shard``: ``fsdp="full_shard"``, ``fsdp_config={"fsdp_version": 2, ...}``) runs the
same way: the loss function is the sharded root module's forward (``call_as_forward``), so FSDP2 unshards the
root's parameters around it, and each decoder layer's group unshards as the base model runs it. accelerate puts
the lm_head in one group with the final norm, which the base model runs: the fused losses read the head after
the base model's forward (model_glue ``_head_after_forward``), when it is the full, unsharded weight, and its
gradient is reduce-scattered with the norm's. This keeps the head whole rather than using the vocab-parallel
``process_group`` path of ``fused_replay_kl``: the ranks hold different tokens, so a vocab-split head would need
every rank's hidden states. A frozen head in a group that never runs (PEFT: accelerate finds no final norm
next to it) is all-gathered by the loss; a trainable one there is refused by ``fused_replay_kl``. Gradients are
averaged over ranks as under DDP, so the normalization above holds unchanged. Evaluation and
``eval_replay_buffer`` also run as the root's forward. FSDP version 1, DeepSpeed, tensor/context/sequence
parallelism and DataParallel (several GPUs in one process) are refused.

Evaluation: with ``prediction_loss_only`` (Trainer's choice when there is no ``compute_metrics``) the task
loss of each evaluation batch goes through ``task_nll`` (no full logits; it equals Trainer's own
``eval_loss``); predictions for ``compute_metrics`` need the logits and use Trainer's own step. With an
``eval_replay_buffer`` (held-out replay, never trained on) every evaluation also logs the drift from the
original model, ``eval_replay_kl`` and ``eval_replay_nll`` with their standard errors
(``measure_forgetting``). Checkpoints hold the replay stream's position
(``replay_state.json``): ``train(resume_from_checkpoint=...)`` continues it exactly where it stopped, as
Trainer does with its own data, so an interrupted run ends with the uninterrupted run's parameters.
"""

from __future__ import annotations

import collections
import contextlib
import json
import numbers
import os
import warnings
from typing import Mapping, Optional, Union

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ._inputs import skip_value_checks, value_checks_enabled
from ._weight_grad_share import loss_term, shared_weight_grad
from .forgetting import measure_forgetting
from .model_glue import (
    ReplayKLLoss,
    _bad_target_flag,
    check_replay_weight,
    check_task_targets,
    lm_head_of,
    task_nll,
)
from .replay_buffer import ReplayBuffer, ShardedReplayBuffer
from .replay_stream import ReplayStream

__all__ = ["ReplayTrainerMixin"]

REPLAY_STATE_NAME = "replay_state.json"  # in each checkpoint folder: where the replay stream resumes


class _ReplayStreamStart(TrainerCallback):
    """At the start of every training loop (also the retries of ``auto_find_batch_size``), after Trainer has
    loaded a checkpoint's state: the replay stream restarts at its start position, and the replay log
    means count steps from the loop's first step."""

    def __init__(self, trainer: "ReplayTrainerMixin"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        t._replay, t._replay_sums = None, None  # the stream restarts at t._replay_start
        t._replay_window.clear()
        t._replay_logged_step = state.global_step


class ReplayTrainerMixin:
    """Task NLL + ``replay_weight`` * replay KL as the training loss of the Trainer class it is mixed into
    (listed before it). Arguments: see ``ReplayTrainer``."""

    # Keys of a task batch besides input_ids / attention_mask / labels handed to the base model: the sequence
    # boundaries of packed, padding-free batches (position ids restart at 0 per sequence; transformers derives a
    # block-diagonal mask from them, flash-attention kernels read the cumulative lengths).
    TASK_MODEL_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")

    def __init__(
        self,
        *args,
        replay_buffer: Union[ReplayBuffer, ShardedReplayBuffer, str, os.PathLike],
        replay_weight: float = 1.0,
        replay_batch_size: Optional[int] = None,
        replay_seed: int = 0,
        replay_loss: Optional[ReplayKLLoss] = None,
        replay_temperature: float = 1.0,
        validate_replay: bool = True,
        eval_replay_buffer: Union[ReplayBuffer, ShardedReplayBuffer, str, os.PathLike, None] = None,
        **kwargs,
    ):
        self.replay_weight = check_replay_weight(replay_weight)
        if replay_batch_size is not None and (
            isinstance(replay_batch_size, bool) or not isinstance(replay_batch_size, int) or replay_batch_size < 1
        ):
            raise ValueError(f"replay_batch_size must be None or a positive int, got {replay_batch_size!r}")
        if isinstance(replay_seed, bool) or not isinstance(replay_seed, numbers.Integral):
            raise TypeError(f"replay_seed must be an int, got {type(replay_seed).__name__}")
        if replay_loss is not None and not isinstance(replay_loss, ReplayKLLoss):
            raise TypeError(f"replay_loss must be a ReplayKLLoss or None, got {type(replay_loss).__name__}")
        super().__init__(*args, **kwargs)
        self._check_parallelism()
        _, weight, _ = lm_head_of(self.model)  # refuses softcapped/scaled heads and LoRA'd lm_heads up front
        vocab = weight.shape[0]
        replay_buffer = _checked_buffer("replay_buffer", replay_buffer, vocab, validate_replay)
        self.eval_replay_buffer = (None if eval_replay_buffer is None else
                                   _checked_buffer("eval_replay_buffer", eval_replay_buffer, vocab, validate_replay))
        if replay_loss is None:
            replay_loss = ReplayKLLoss(mode=replay_buffer.mode, temperature=replay_temperature)
        elif replay_loss.loss != "nll" and replay_loss.mode not in ("topk", replay_buffer.mode):  # nll: no teacher
            raise ValueError(f"replay_loss has mode={replay_loss.mode!r} but replay_buffer holds a "
                             f"{replay_buffer.mode!r} teacher (use mode={replay_buffer.mode!r} or 'topk')")
        if replay_loss.reduction != "mean":
            raise ValueError(f"replay_loss must have reduction='mean', got {replay_loss.reduction!r}")
        self.replay_buffer = replay_buffer
        self.replay_loss = replay_loss
        self.replay_batch_size = replay_batch_size or max(1, self.args.per_device_train_batch_size // 2)
        self.replay_seed = int(replay_seed)
        self._replay = None  # this rank's ReplayStream, made at the first replay batch of a training loop
        self._replay_start = 0  # stream position (in single-process batches) the stream starts from
        self._replay_window = collections.deque()  # (batch, window replay count) of the current optimizer step
        self._replay_sums = None  # [task, kl] since the last log, on the device
        self._replay_logged_step = 0
        self.add_callback(_ReplayStreamStart(self))

    def _check_parallelism(self):
        """One process, DDP, or FSDP2 (accelerate's ``fully_shard``), one device per process; anything else refused."""
        name = type(self).__name__
        fsdp2_hint = ("use FSDP2 through the Trainer instead: fsdp='full_shard', fsdp_config={'fsdp_version': 2, "
                      "'transformer_layer_cls_to_wrap': [...]} (README, 'Fine-tune with the HF Trainer')")
        if getattr(self, "is_deepspeed_enabled", False):
            raise NotImplementedError(
                f"{name} does not support DeepSpeed (ZeRO-3 shards the lm_head, which the fused loss reads outside any "
                f"DeepSpeed-gathered forward, and it is not tested): {fsdp2_hint}")
        fsdp = getattr(self, "is_fsdp_enabled", False)
        if fsdp and not getattr(self.accelerator, "is_fsdp2", False):
            raise NotImplementedError(f"{name} does not support FSDP version 1: {fsdp2_hint}")
        distributed = self.accelerator.distributed_type.name
        others = {n: getattr(self, f"get_{n}_size", lambda: 1)() for n in ("tp", "cp", "sp")}
        if (self.args.n_gpu > 1 or not (distributed in ("NO", "FSDP") or distributed.startswith("MULTI_"))
                or any(v > 1 for v in others.values())):
            raise NotImplementedError(
                f"{name} supports one process, DDP or FSDP2 data parallelism (one device per process), got "
                f"distributed_type={distributed}, n_gpu={self.args.n_gpu}, "
                f"{', '.join(f'{k}_size={v}' for k, v in others.items())}")

    # -- the replay stream --------------------------------------------------------------------------------

    def next_replay_batch(self):
        # The single-process stream is the passes' batches one after the other; under DDP rank r takes the
        # stream positions r, r + N, r + 2N, ... (only those are read), so the ranks replay disjoint batches
        # that together make the single-process stream. It starts at position self._replay_start, a
        # multiple of N (resumed from a checkpoint: replay_state.json).
        if self._replay is None:
            self._replay = ReplayStream(self.replay_buffer, self.replay_batch_size, seed=self.replay_seed,
                                        device=self.args.device, rank=self.args.process_index,
                                        world_size=self.args.world_size, position=self._replay_start)
        return next(self._replay)

    @property
    def replay_passes(self) -> int:
        """Completed passes over the replay buffer (pass p is shuffled with seed ``replay_seed + p``)."""
        return self.replay_position // self.replay_buffer.num_batches(self.replay_batch_size)

    @property
    def replay_position(self) -> int:
        """Batches of the single-process replay stream consumed by all ranks together (where training
        resumes). Every rank takes one replay batch per micro-batch, so all have taken equally many."""
        return self._replay.position if self._replay is not None else self._replay_start

    # -- checkpoints: the replay stream resumes where it stopped ----------------------------------------------

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        # Written first, into the folder Trainer is about to fill: checkpoint rotation and hub pushes, which
        # run inside Trainer's own save, then see it, and no checkpoint exists without it.
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            os.makedirs(folder, exist_ok=True)
            state = {"format": 1, "replay_position": self.replay_position, "replay_seed": self.replay_seed,
                     "replay_batch_size": self.replay_batch_size, "replay_sequences": len(self.replay_buffer)}
            tmp = os.path.join(folder, REPLAY_STATE_NAME + ".tmp")
            with open(tmp, "w") as f:
                json.dump(state, f, indent=2)
            os.replace(tmp, os.path.join(folder, REPLAY_STATE_NAME))
        super()._save_checkpoint(model, trial, *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer raises below
        self._replay_start = 0  # a run from scratch replays from the stream's start, as Trainer's data
        if checkpoint is not None and checkpoint is not False:
            self._restore_replay_state(os.fspath(checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore_replay_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, REPLAY_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"{checkpoint} has no {REPLAY_STATE_NAME} (not written by a replay trainer): the replay stream "
                          "restarts at its first pass")
            return
        with open(path) as f:
            state = json.load(f)
        ours = {"replay_seed": self.replay_seed, "replay_batch_size": self.replay_batch_size,
                "replay_sequences": len(self.replay_buffer)}
        changed = [f"{k}: {state.get(k)} then, {v} now" for k, v in ours.items() if state.get(k) != v]
        if changed:
            warnings.warn(f"the replay stream of {checkpoint} was made with other settings ({', '.join(changed)}): "
                          "it restarts at its first pass")
            return
        position = int(state["replay_position"])
        # A multiple of the ranks (exact when N is unchanged); the stream restarts there at on_train_begin.
        self._replay_start = position - position % self.args.world_size

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._check_task_window(batch_samples)
        # The replay batches of this optimizer step, and their counted positions all together.
        self._replay_window.clear()
        batches = [self.next_replay_batch() for _ in batch_samples]
        if self.args.world_size > 1:
            # Global counts, the same on every rank (see compute_loss). Every rank runs this once per
            # optimizer step (accelerate gives the ranks equally many batches), so the collectives match.
            count = sum((b["mask"].sum() for b in batches), torch.zeros((), dtype=torch.long, device=device))
            torch.distributed.all_reduce(count)
            if num_items_in_batch is not None and not self.args.average_tokens_across_devices:
                # Trainer counted this rank's labels only (with average_tokens_across_devices it gathers).
                num_items_in_batch = torch.as_tensor(num_items_in_batch, device=device).clone()
                torch.distributed.all_reduce(num_items_in_batch)
        elif batches:
            count = sum(b["mask"].sum() for b in batches)
        if batches:
            count = count.clamp_min(1)
            self._replay_window.extend((b, count) for b in batches)
        return batch_samples, num_items_in_batch

    def _check_task_window(self, batch_samples):
        """The value check of task_nll for a whole accumulation window at once: one host sync per
        optimizer step (none at all for batches still on the host), not one per micro-step."""
        if not value_checks_enabled():
            return
        def well_formed(b):  # anything else is refused by task_nll's own argument checks, with their message
            ids = b.get("input_ids") if isinstance(b, Mapping) else None
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
                return False
            return all(b.get(name) is None or (isinstance(b[name], torch.Tensor) and b[name].shape == ids.shape)
                       for name in ("labels", "attention_mask"))

        samples = [b for b in batch_samples if well_formed(b)]
        vocab = lm_head_of(self.model)[1].shape[0]  # read now: model_init or a resize may have changed it
        flags = [_bad_target_flag(b["input_ids"], b.get("attention_mask"), b.get("labels"), vocab, -100) for b in samples]
        if flags and bool(torch.stack([f.to(flags[0].device) for f in flags]).any()):  # the one sync
            for b in samples:  # raises for the first bad batch, with task_nll's message
                check_task_targets(b["input_ids"], b.get("attention_mask"), b.get("labels"), vocab)

    # -- the loss -------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if "input_ids" not in inputs:
            raise KeyError(f"{type(self).__name__} needs 'input_ids' in every training batch (and optionally "
                           "'attention_mask' and 'labels')")
        ga_steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if self._replay_window:  # a batch of the window get_batch_samples prefetched and checked
            replay_batch, replay_count = self._replay_window.popleft()
            task_checked = True
        else:  # compute_loss called outside Trainer's prefetching loop
            replay_batch, replay_count = self.next_replay_batch(), None
            task_checked = False
        unwrapped = self.accelerator.unwrap_model(model)
        # Normalization over N ranks. DDP averages the ranks' gradients: g = (1/N) sum_r grad(L_r). A term
        # normalized by a global count C (num_items_in_batch: the labels of all ranks' windows, gathered by
        # Trainer with average_tokens_across_devices, all-reduced in get_batch_samples otherwise; replay_count:
        # the all-reduced teacher positions of all ranks' windows) is L_r = N * S_r / C, S_r the rank's sum
        # over its micro-batches. Then g = (1/N) sum_r N grad(S_r) / C = grad(sum_r S_r) / C: the gradient of
        # one process over the union of the ranks' batches. A term without a global count (no labels, or
        # compute_loss outside Trainer's loop) stays the per-rank mean, averaged over ranks as Trainer does.
        world = self.args.world_size
        replay_loss, weight = self.replay_loss, self.replay_weight

        def replay_forward(task_inputs, replay):
            # Only the sum is backpropagated (the parts are logged detached): its fused losses hold one lm_head
            # weight gradient between forward and backward, not one each (_weight_grad_share.py). The counts'
            # divisions are declared by task_nll and ReplayKLLoss; world and 1 / ga_steps are common factors.
            with self.accelerator.autocast(), shared_weight_grad():
                # The task labels were checked with their window (get_batch_samples), else here (one host
                # sync); the replay buffer was validated once in __init__.
                with skip_value_checks() if task_checked else contextlib.nullcontext():
                    if num_items_in_batch is not None:
                        task = world * self._task_nll(unwrapped, task_inputs, num_items_in_batch=num_items_in_batch)
                    else:
                        task = self._task_nll(unwrapped, task_inputs) / ga_steps
                with skip_value_checks(), loss_term(weight):
                    if replay_count is not None:
                        kl = world * replay_loss(unwrapped, replay, num_items=replay_count)
                    else:
                        kl = replay_loss(unwrapped, replay) / ga_steps
            return task + weight * kl, task.detach(), kl.detach()

        loss, task, kl = call_as_forward(model, unwrapped, replay_forward, inputs, replay_batch)
        sums = torch.stack([task.float(), kl.float()])
        self._replay_sums = sums if self._replay_sums is None else self._replay_sums + sums
        return loss

    # Both terms are normalized over the accumulation window above: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    # -- evaluation -----------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Only the loss is wanted (no compute_metrics): the task NLL through the fused path, as Trainer's own
        # step computes it from full logits (the mean over the batch's counted labels).
        if not prediction_loss_only or inputs.get("labels") is None or "input_ids" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        unwrapped = self.accelerator.unwrap_model(model)

        def eval_forward(batch):
            with self.accelerator.autocast():
                return self._task_nll(unwrapped, batch)

        with torch.no_grad():
            loss = call_as_forward(model, unwrapped, eval_forward, inputs)
        return loss.detach(), None, None

    def _task_nll(self, model, inputs, num_items_in_batch=None):
        """The fused task NLL of a batch (``task_nll``), its sequence boundaries (``TASK_MODEL_KEYS``) honoured."""
        extra = {k: inputs[k] for k in self.TASK_MODEL_KEYS if inputs.get(k) is not None}
        position_ids = extra.pop("position_ids", None)
        return task_nll(model, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"),
                        position_ids=position_ids, model_kwargs=extra or None, num_items_in_batch=num_items_in_batch,
                        impl=self.replay_loss.impl, chunk_size=self.replay_loss.chunk_size)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.eval_replay_buffer is not None:  # in the metrics Trainer logs and returns
            unwrapped = self.accelerator.unwrap_model(self.model)

            def measure():
                with self.accelerator.autocast():
                    return measure_forgetting(unwrapped, self.eval_replay_buffer,
                                              batch_size=self.args.per_device_eval_batch_size,
                                              temperature=self.replay_loss.temperature, device=self.args.device,
                                              progress=False)

            with torch.no_grad():
                report = call_as_forward(self.model, unwrapped, measure)
            output.metrics.update(report.as_dict(f"{metric_key_prefix}_"))
        return output

    def log(self, logs, start_time=None):
        if "loss" in logs and self._replay_sums is not None:
            steps = max(1, self.state.global_step - self._replay_logged_step)
            sums = self._replay_sums / steps
            if self.args.world_size > 1:  # every rank logs here (Trainer gathers its loss just before)
                sums = sums.clone()
                torch.distributed.all_reduce(sums)
                sums /= self.args.world_size  # the ranks' mean: the global values (see compute_loss)
            task, kl = sums.tolist()
            logs["task_loss"] = round(task, 6)
            logs["replay_kl"] = round(kl, 6)
            self._replay_sums = None
            self._replay_logged_step = self.state.global_step
        return super().log(logs, start_time)


def call_as_forward(wrapped, unwrapped, fn, *args):
    """``fn(*args)`` run as ``unwrapped``'s forward through ``wrapped(*args)``: the hooks of the wrapper fire around
    it (DDP's reducer preparing backward; FSDP2's all-gather of the root group's parameters, the lm_head and
    embeddings, so that they are full tensors while ``fn`` reads them, and their reshard and gradient
    reduce-scatter in backward). Without a wrapper ``wrapped`` is ``unwrapped`` and this is a plain call."""
    absent = object()
    saved = unwrapped.__dict__.get("forward", absent)  # e.g. accelerate's autocast wrapper, TRL's fused head
    unwrapped.forward = fn
    try:
        return wrapped(*args)
    finally:
        if saved is absent:
            del unwrapped.forward
        else:
            unwrapped.forward = saved


def _checked_buffer(name, buffer, vocab: int, validate: bool):
    """``buffer`` (or the directory of one, loaded) checked against the lm_head's vocabulary and validated
    once (unless ``validate`` is False, or a ShardedReplayBuffer opened with validation already was)."""
    if isinstance(buffer, (str, os.PathLike)):
        buffer = ReplayBuffer.load(buffer, expected_vocab_size=vocab)  # validates
    elif isinstance(buffer, (ReplayBuffer, ShardedReplayBuffer)):
        if buffer.vocab_size != vocab:
            raise ValueError(
                f"{name} was recorded for a vocabulary of {buffer.vocab_size} tokens, but the model's lm_head has "
                f"{vocab} rows: replay from another model (or tokenizer) cannot be used"
            )
        if validate and not getattr(buffer, "validated", False):
            buffer.validate()
    else:
        raise TypeError(f"{name} must be a ReplayBuffer, a ShardedReplayBuffer or a directory path, "
                        f"got {type(buffer).__name__}")
    if len(buffer) == 0:
        raise ValueError(f"{name} holds no sequences")
    return buffer
