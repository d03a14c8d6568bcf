"""Self-generated replay inside a Hugging Face ``Trainer``: ``ReplayTrainer``.

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

Mixed precision: accelerate's autocast wraps the model's ``forward``, which is bypassed here (only the
base model runs), so ``compute_loss`` enters ``accelerator.autocast()`` itself.

Logging: each training log (every ``logging_steps``) gets ``task_loss`` and ``replay_kl``, their means
over the optimizer steps since the previous log (``loss`` = ``task_loss + replay_weight * replay_kl``).

Evaluation (``return_outputs=True`` or the model in eval mode) falls back to Trainer's own loss, which
computes full logits: prediction needs them. One process on one device only: the base model is called past
any DDP/FSDP/DataParallel wrapper, which would skip gradient synchronization, so more is refused (for data
parallelism see README, "Data-parallel training"). Resuming from a checkpoint restarts the replay stream
at its first pass.
"""

from __future__ import annotations

import collections
import numbers
import os
from typing import Optional, Union

import torch
from transformers import Trainer

from ._inputs import skip_value_checks
from .model_glue import ReplayKLLoss, check_replay_weight, lm_head_of, task_nll
from .replay_buffer import ReplayBuffer, ShardedReplayBuffer

__all__ = ["ReplayTrainer"]


class ReplayTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is task NLL + ``replay_weight`` * replay KL.

    Args (besides Trainer's own):
        replay_buffer: a ``ReplayBuffer``, a ``ShardedReplayBuffer`` (``ReplayBuffer.open(dir)``: read
            lazily, for buffers larger than RAM) or the directory of one (loaded into memory with the
            model's vocabulary size as ``expected_vocab_size``). Its vocabulary must equal the lm_head's rows; it is
            validated once here (``validate_replay=False`` skips that for a buffer validated already),
            so training steps run under ``skip_value_checks()``.
        replay_weight: lambda >= 0 (the paper used 1 to 10).
        replay_batch_size: replay sequences per micro-batch (default: half of
            ``per_device_train_batch_size``, at least 1).
        replay_seed: shuffle seed of the first pass over the buffer (pass p uses ``replay_seed + p``).
        replay_loss: the ``ReplayKLLoss`` (default: the buffer's mode, temperature 1).
    """

    def __init__(
        self,
        *args,
        replay_buffer: Union[ReplayBuffer, ShardedReplayBuffer, str, os.PathLike],
        replay_weight: float = 1.0,
        replay_batch_size: Optional[int] = None,
        replay_seed: int = 0,
        replay_loss: Optional[ReplayKLLoss] = None,
        validate_replay: bool = True,
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
        if self.args.world_size > 1 or self.args.n_gpu > 1:
            raise NotImplementedError(
                f"ReplayTrainer runs in one process on one device for now (world_size={self.args.world_size}, "
                f"n_gpu={self.args.n_gpu}): it calls the base model past the DDP/FSDP/DataParallel wrapper, "
                "which would skip the gradient synchronization. For data-parallel training compute the loss in "
                "the forward of the wrapped module (README, 'Data-parallel training')"
            )
        _, weight, _ = lm_head_of(self.model)  # refuses softcapped/scaled heads and LoRA'd lm_heads up front
        vocab = weight.shape[0]
        if isinstance(replay_buffer, (str, os.PathLike)):
            replay_buffer = ReplayBuffer.load(replay_buffer, expected_vocab_size=vocab)  # validates
        elif isinstance(replay_buffer, (ReplayBuffer, ShardedReplayBuffer)):
            if replay_buffer.vocab_size != vocab:
                raise ValueError(
                    f"replay_buffer was recorded for a vocabulary of {replay_buffer.vocab_size} tokens, but the "
                    f"model's lm_head has {vocab} rows: replay from another model (or tokenizer) cannot be used"
                )
            # A ShardedReplayBuffer opened with validate=True was validated shard by shard already.
            if validate_replay and not getattr(replay_buffer, "validated", False):
                replay_buffer.validate()
        else:
            raise TypeError(f"replay_buffer must be a ReplayBuffer, a ShardedReplayBuffer or a directory path, got {type(replay_buffer).__name__}")
        if len(replay_buffer) == 0:
            raise ValueError("replay_buffer holds no sequences")
        if replay_loss is None:
            replay_loss = ReplayKLLoss(mode=replay_buffer.mode)
        elif replay_loss.mode != "topk" and replay_loss.mode != replay_buffer.mode:
            raise ValueError(f"replay_loss has mode={replay_loss.mode!r} but replay_buffer holds a "
                             f"{replay_buffer.mode!r} teacher (use mode={replay_buffer.mode!r} or 'topk')")
        if replay_loss.reduction != "mean":
            raise ValueError(f"replay_loss must have reduction='mean', got {replay_loss.reduction!r}")
        self.replay_buffer = replay_buffer
        self.replay_loss = replay_loss
        self.replay_batch_size = replay_batch_size or max(1, self.args.per_device_train_batch_size // 2)
        self.replay_seed = int(replay_seed)
        self.replay_passes = 0  # completed passes over the replay buffer
        self._replay_iter = None
        self._replay_window = collections.deque()  # (batch, window replay count) of the current optimizer step
        self._replay_sums = None  # [task, kl] since the last log, on the device
        self._replay_logged_step = 0

    # -- the replay stream --------------------------------------------------------------------------------

    def _replay_stream(self):
        while True:
            seed = self.replay_seed + self.replay_passes
            for batch in self.replay_buffer.batches(self.replay_batch_size, shuffle=True, seed=seed,
                                                    device=self.args.device):
                yield batch
            self.replay_passes += 1

    def next_replay_batch(self):
        if self._replay_iter is None:
            self._replay_iter = self._replay_stream()
        return next(self._replay_iter)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        # The replay batches of this optimizer step, and their counted positions all together.
        self._replay_window.clear()
        batches = [self.next_replay_batch() for _ in batch_samples]
        if batches:
            count = sum(b["mask"].sum() for b in batches).clamp_min(1)
            self._replay_window.extend((b, count) for b in batches)
        return batch_samples, num_items_in_batch

    # -- the loss -------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if "input_ids" not in inputs:
            raise KeyError("ReplayTrainer needs 'input_ids' in every training batch (and optionally "
                           "'attention_mask' and 'labels')")
        ga_steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if self._replay_window:
            replay_batch, replay_count = self._replay_window.popleft()
        else:  # compute_loss called outside Trainer's prefetching loop
            replay_batch, replay_count = self.next_replay_batch(), None
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():
            # The task labels are checked (one host sync); the replay buffer was validated once in __init__.
            if num_items_in_batch is not None:
                task = task_nll(unwrapped, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"),
                                num_items_in_batch=num_items_in_batch, impl=self.replay_loss.impl,
                                chunk_size=self.replay_loss.chunk_size)
            else:
                task = task_nll(unwrapped, inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels"),
                                impl=self.replay_loss.impl, chunk_size=self.replay_loss.chunk_size) / ga_steps
            with skip_value_checks():
                if replay_count is not None:
                    kl = self.replay_loss(unwrapped, replay_batch, num_items=replay_count)
                else:
                    kl = self.replay_loss(unwrapped, replay_batch) / ga_steps
        sums = torch.stack([task.detach().float(), kl.detach().float()])
        self._replay_sums = sums if self._replay_sums is None else self._replay_sums + sums
        return task + self.replay_weight * kl

    # Both terms are normalized over the accumulation window above: Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def log(self, logs, start_time=None):
        if "loss" in logs and self._replay_sums is not None:
            steps = max(1, self.state.global_step - self._replay_logged_step)
            task, kl = (self._replay_sums / steps).tolist()
            logs["task_loss"] = round(task, 6)
            logs["replay_kl"] = round(kl, 6)
            self._replay_sums = None
            self._replay_logged_step = self.state.global_step
        return super().log(logs, start_time)
