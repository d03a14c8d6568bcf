"""selfreplay-fast: fine-tune LLMs without catastrophic forgetting, fast and on small GPUs.

Self-generated replay (sample text from the frozen original model, record its top-k distribution) plus
a KL penalty toward that cached teacher while fine-tuning. See README.md and docs/design.md.
"""

from ._inputs import skip_value_checks
from .audit import AuditResult, audit  # the function; the module stays importable as selfreplay_fast.audit
from .forgetting import ForgettingReport, measure_forgetting
from .generation import (
    Drafter, GenerationStats, ModelDrafter, NGramDrafter, SelfDialogue, generate_replay, load_model_for_generation,
    task_prompts,
)
from .model_glue import ReplayKLLoss, ReplayStepLosses, last_hidden_states, lm_head_of, replay_step, task_nll
from .reference import reference_replay_kl
from .replay_buffer import ReplayBuffer, ReplayBufferError, ShardedBufferWriter, ShardedReplayBuffer
from .replay_kl import fused_replay_kl
from .teacher_cache import build_teacher_cache
from .topk import extension_available, linear_topk_logprobs, topk_logprobs

__version__ = "0.1.0"


def __getattr__(name):
    # ReplayTrainer, ReplaySFTTrainer and ForgettingCallback import transformers.Trainer (slow, pulls in accelerate): only on first use.
    if name == "ReplayTrainer":
        from .trainer import ReplayTrainer

        return ReplayTrainer
    if name in ("ReplaySFTTrainer", "ReplaySFTConfig"):  # needs the `trl` extra
        from . import sft_trainer

        return getattr(sft_trainer, name)
    if name == "ForgettingCallback":
        from .forgetting_callback import ForgettingCallback

        return ForgettingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "fused_replay_kl",
    "reference_replay_kl",
    "skip_value_checks",
    "generate_replay",
    "SelfDialogue",
    "task_prompts",
    "load_model_for_generation",
    "ReplayBuffer",
    "ReplayBufferError",
    "ShardedReplayBuffer",
    "ShardedBufferWriter",
    "GenerationStats",
    "Drafter",
    "ModelDrafter",
    "NGramDrafter",
    "extension_available",
    "topk_logprobs",
    "linear_topk_logprobs",
    "build_teacher_cache",
    "lm_head_of",
    "last_hidden_states",
    "task_nll",
    "ReplayKLLoss",
    "ReplayStepLosses",
    "replay_step",
    "ReplayTrainer",
    "measure_forgetting",
    "audit",
    "AuditResult",
    "ForgettingCallback",
    "ForgettingReport",
    "__version__",
]
