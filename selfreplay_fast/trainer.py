"""Self-generated replay inside a Hugging Face ``Trainer``: ``ReplayTrainer``.

Every training micro-batch costs the task NLL plus ``replay_weight`` times the KL to the cached teacher on
one replay batch, both through ``fused_replay_kl``: no [tokens, V] logits exist in a training step. The
replay logic (gradient accumulation, mixed precision, DDP, evaluation, checkpoints of the replay stream,
the ``task_loss`` / ``replay_kl`` logs) lives in ``ReplayTrainerMixin`` (replay_trainer_core.py), shared with
TRL's ``ReplaySFTTrainer`` (sft_trainer.py); this is that mixin on the plain ``transformers.Trainer``.
"""

from __future__ import annotations

from transformers import Trainer

from .replay_trainer_core import REPLAY_STATE_NAME, ReplayTrainerMixin

__all__ = ["ReplayTrainer", "REPLAY_STATE_NAME"]


class ReplayTrainer(ReplayTrainerMixin, Trainer):
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
        replay_loss: the ``ReplayKLLoss`` (default: the buffer's mode at ``replay_temperature``, default 1).
        eval_replay_buffer: held-out replay (same kinds as ``replay_buffer``) measured at every evaluation:
            ``eval_replay_kl``, ``eval_replay_nll`` and their ``_stderr`` (see ``measure_forgetting``).
    """
