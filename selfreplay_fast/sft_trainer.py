"""Self-generated replay inside TRL's ``SFTTrainer``: ``ReplaySFTTrainer`` and its ``ReplaySFTConfig``.

An existing SFT script gains replay by changing ``SFTTrainer`` to ``ReplaySFTTrainer`` and ``SFTConfig`` to
``ReplaySFTConfig`` with three fields (``replay_buffer_path``, ``replay_weight``, ``replay_batch_size``); the
fields parse from the command line and YAML like TRL's own (``TrlParser((ReplaySFTConfig,))``).

The training loss is ``ReplayTrainerMixin``'s (replay_trainer_core.py, shared with ``ReplayTrainer``): the task
NLL through ``task_nll`` plus ``replay_weight`` times the KL to the cached teacher, both fused (no [tokens, V]
logits), logged as ``task_loss`` and ``replay_kl``. The task term reads the ``labels`` TRL's dataset
preparation and collator build, so every dataset form TRL trains on feeds it unchanged: plain text (every
token), prompt-completion with ``completion_only_loss`` (prompt labels -100), conversational ``messages``
through the chat template with ``assistant_only_loss`` (non-assistant labels -100), and packed or
padding-free batches: one row of concatenated sequences whose ``position_ids`` restart at 0 per sequence,
no attention mask, and each sequence's first label -100. The position ids (and flash attention's
``cu_seq_lens_*``) go to the base model, so a sequence attends within itself only (transformers builds the
block-diagonal mask from the position ids for eager / SDPA attention), as in TRL's own loss.

Not available with replay (refused with an error): ``loss_type="dft"``, label smoothing, a
``compute_loss_func`` and MoE router auxiliary losses (they change the task term). TRL's training-time
``entropy`` / ``mean_token_accuracy`` / ``num_tokens`` metrics come from its own loss and are not logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from trl import SFTConfig, SFTTrainer

from ._inputs import MODES, check_temperature
from .model_glue import ReplayKLLoss, check_replay_weight
from .replay_trainer_core import ReplayTrainerMixin

__all__ = ["ReplaySFTConfig", "ReplaySFTTrainer"]


@dataclass
class ReplaySFTConfig(SFTConfig):
    r"""``SFTConfig`` plus the replay settings of ``ReplaySFTTrainer`` (each also a ``--flag`` / YAML key)."""

    replay_buffer_path: Optional[str] = field(
        default=None,
        metadata={"help": "Directory of the replay buffer (written by `selfreplay generate` / `generate_replay`). "
                          "Required unless the trainer gets `replay_buffer=`."},
    )
    replay_weight: float = field(
        default=1.0,
        metadata={"help": "Weight lambda >= 0 of the replay KL in the loss (task NLL + lambda * KL); the paper used "
                          "1 to 10. 0 trains on the task alone."},
    )
    replay_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "Replay sequences per micro-batch. Default: half of `per_device_train_batch_size`, at "
                          "least 1."},
    )
    replay_seed: int = field(
        default=0,
        metadata={"help": "Shuffle seed of the first pass over the replay buffer (pass p uses replay_seed + p)."},
    )
    replay_mode: Optional[str] = field(
        default=None,
        metadata={"help": "KL mode: 'tail', 'sampled' or 'topk'. Default: the buffer's own mode.",
                  "choices": list(MODES)},
    )
    replay_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature dividing the model's logits in the replay KL."},
    )
    eval_replay_buffer_path: Optional[str] = field(
        default=None,
        metadata={"help": "Directory of a held-out replay buffer (never trained on): every evaluation logs "
                          "eval_replay_kl and eval_replay_nll, the drift from the original model."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.replay_weight = check_replay_weight(self.replay_weight)
        if self.replay_batch_size is not None and (isinstance(self.replay_batch_size, bool)
                                                   or not isinstance(self.replay_batch_size, int)
                                                   or self.replay_batch_size < 1):
            raise ValueError(f"replay_batch_size must be None or a positive int, got {self.replay_batch_size!r}")
        if self.replay_mode is not None and self.replay_mode not in MODES:
            raise ValueError(f"replay_mode must be None or one of {MODES}, got {self.replay_mode!r}")
        self.replay_temperature = check_temperature(self.replay_temperature)


class ReplaySFTTrainer(ReplayTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` whose training loss is task NLL + ``replay_weight`` * replay KL (see the module).

    Args: those of ``SFTTrainer``, with ``args`` a ``ReplaySFTConfig``, plus
        replay_buffer: a ``ReplayBuffer`` / ``ShardedReplayBuffer`` (or a directory) instead of
            ``args.replay_buffer_path``.
        eval_replay_buffer: likewise instead of ``args.eval_replay_buffer_path``.
        validate_replay: False skips validating a buffer that was validated already.
    """

    def __init__(self, model, args: Optional[ReplaySFTConfig] = None, *sft_args, replay_buffer=None,
                 eval_replay_buffer=None, validate_replay: bool = True, **sft_kwargs):
        if not isinstance(args, ReplaySFTConfig):
            raise TypeError(f"args must be a ReplaySFTConfig (an SFTConfig with the replay fields), "
                            f"got {type(args).__name__}")
        if replay_buffer is None:
            replay_buffer = args.replay_buffer_path
        if replay_buffer is None:
            raise ValueError("ReplaySFTConfig.replay_buffer_path is not set: give the directory of the replay buffer "
                             "(or pass replay_buffer= to ReplaySFTTrainer)")
        if args.loss_type != "nll":
            raise ValueError(f"ReplaySFTTrainer trains the task NLL: loss_type must be 'nll', got {args.loss_type!r}")
        if args.label_smoothing_factor:
            raise ValueError(f"label_smoothing_factor must be 0 with replay (the fused task loss is the plain NLL), "
                             f"got {args.label_smoothing_factor}")
        if sft_kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func cannot be combined with replay: the task loss is the fused NLL")
        replay_loss = (None if args.replay_mode is None
                       else ReplayKLLoss(mode=args.replay_mode, temperature=args.replay_temperature))
        super().__init__(model, args, *sft_args, replay_buffer=replay_buffer, replay_weight=args.replay_weight,
                         replay_batch_size=args.replay_batch_size, replay_seed=args.replay_seed,
                         replay_loss=replay_loss, replay_temperature=args.replay_temperature,
                         validate_replay=validate_replay,
                         eval_replay_buffer=(eval_replay_buffer if eval_replay_buffer is not None
                                             else args.eval_replay_buffer_path), **sft_kwargs)
        if getattr(self, "aux_loss_enabled", False):
            raise NotImplementedError("the model has an MoE router auxiliary loss: not supported with replay yet "
                                      "(set router_aux_loss_coef=0 to train without it)")
