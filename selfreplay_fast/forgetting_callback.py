"""``ForgettingCallback``: the drift from the original model at every evaluation of any Trainer.

For runs with or without replay (plain ``transformers.Trainer``, TRL trainers, ``ReplayTrainer``): at each
evaluation it runs :func:`~selfreplay_fast.measure_forgetting` on a held-out replay buffer, logs
``eval_replay_kl``, ``eval_replay_nll`` and their standard errors through the trainer (so every reporting
integration sees them, and ``trainer.evaluate()`` returns them), and optionally warns or stops training when
the KL passes a threshold. (``ReplayTrainer(eval_replay_buffer=...)`` logs the same numbers itself: use one.)
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional

from transformers import TrainerCallback

from .forgetting import _check_batch_size, measure_forgetting

__all__ = ["ForgettingCallback"]

_ACTIONS = ("warn", "stop")


class ForgettingCallback(TrainerCallback):
    """Args:
        trainer: the Trainer it is added to (as TRL's callbacks take it: logging goes through ``trainer.log``).
        replay: held-out replay, never trained on (a ``ReplayBuffer`` or ``ShardedReplayBuffer``).
        batch_size: replay sequences per forward (default: ``per_device_eval_batch_size``).
        temperature: divides the model's logits (as the replay loss's temperature).
        max_replay_kl: threshold on ``eval_replay_kl`` (nats per token); None: never act.
        on_exceed: "warn" (a ``UserWarning``) or "stop" (training stops after this evaluation).
    """

    def __init__(self, trainer, replay, *, batch_size: Optional[int] = None, temperature: float = 1.0,
                 max_replay_kl: Optional[float] = None, on_exceed: str = "warn"):
        if on_exceed not in _ACTIONS:
            raise ValueError(f"on_exceed must be one of {_ACTIONS}, got {on_exceed!r}")
        if max_replay_kl is not None and (isinstance(max_replay_kl, bool) or not isinstance(max_replay_kl, numbers.Real)
                                          or not math.isfinite(max_replay_kl) or max_replay_kl < 0):
            raise ValueError(f"max_replay_kl must be None or a finite number >= 0, got {max_replay_kl!r}")
        self.trainer = trainer
        self.replay = replay
        self.batch_size = None if batch_size is None else _check_batch_size(batch_size)
        self.temperature = temperature
        self.max_replay_kl = max_replay_kl
        self.on_exceed = on_exceed
        self.last_report = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model)
        with trainer.accelerator.autocast():
            report = measure_forgetting(model, self.replay, batch_size=self.batch_size or args.per_device_eval_batch_size,
                                        temperature=self.temperature, device=args.device, progress=False)
        self.last_report = report
        values = report.as_dict("eval_")
        if metrics is not None:
            metrics.update(values)  # what trainer.evaluate() returns
        trainer.log(values)
        kl = report.replay_kl.value
        if self.max_replay_kl is not None and kl > self.max_replay_kl:
            message = (f"drift from the original model at step {state.global_step}: eval_replay_kl {kl:.5g} > "
                       f"max_replay_kl {self.max_replay_kl:.5g}")
            if self.on_exceed == "stop":
                control.should_training_stop = True
                warnings.warn(message + ": training stops")
            else:
                warnings.warn(message)
        return control
