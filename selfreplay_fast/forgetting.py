"""How far a model has drifted from the original one, measured on replay text alone.

The replay cache holds the original model's predictions (its top-k teacher at every sampled position), so
no copy of the original model is needed: :func:`measure_forgetting` runs the model under test over
held-out replay sequences and reports, each with a standard error over sequences,

* ``replay_kl``: the per-token KL(original || model) as the cache's mode defines it (``"tail"``: the
  (k+1)-bucket lower bound, exact when k = V; ``"sampled"``: the unbiased sampled estimate), the quantity
  the replay loss trains on;
* ``replay_nll``: the model's per-token negative log-likelihood of the replay text (the tokens the
  original model sampled), which rises as the model forgets what it generated;
* ``sequence_kl``: the sequence-level Monte Carlo estimate of KL(original || model) in nats per sequence
  (Bansal & Sanghavi): over sequences x sampled from the original, the mean of
  ``log p_orig(x) - log p_model(x)``, the sum over the sampled tokens of the cached log-prob (cache format v2's
  ``sampled_logprobs``) minus the model's. Unbiased, with the standard error of a mean over sequences; only
  for a buffer that records the sampled log-probs *and* whose text was sampled from the original
  (``metadata["sampled_from_teacher"]``): otherwise None, with ``sequence_kl_unavailable`` saying why.

Both go through ``fused_replay_kl`` from the base model's hidden states: no [tokens x vocab] logits. The
math (ratio estimates over sequences and their delta-method standard errors) is in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

import torch

from ._inputs import skip_value_checks
from .model_glue import last_hidden_states, lm_head_of
from .replay_kl import fused_replay_kl


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean over tokens (or sequences) and its standard error over sequences (NaN from one sequence)."""

    value: float
    stderr: float


@dataclasses.dataclass(frozen=True)
class ForgettingReport:
    """What :func:`measure_forgetting` found; ``as_dict(prefix)`` gives flat, loggable numbers."""

    replay_kl: Estimate
    replay_nll: Estimate
    num_sequences: int
    num_tokens: int  # positions with a teacher: the tokens the original model sampled
    mode: str
    sequence_kl: Optional[Estimate] = None  # nats per sequence; None when the buffer cannot give it
    sequence_kl_unavailable: Optional[str] = None  # why sequence_kl is None

    def as_dict(self, prefix: str = "") -> dict:
        """Flat numbers to log; ``sequence_kl`` only when available (never a stand-in zero)."""
        values = {f"{prefix}replay_kl": self.replay_kl.value, f"{prefix}replay_kl_stderr": self.replay_kl.stderr,
                  f"{prefix}replay_nll": self.replay_nll.value, f"{prefix}replay_nll_stderr": self.replay_nll.stderr}
        if self.sequence_kl is not None:
            values.update({f"{prefix}sequence_kl": self.sequence_kl.value,
                           f"{prefix}sequence_kl_stderr": self.sequence_kl.stderr})
        return values


def ratio_estimate(sums: torch.Tensor, counts: torch.Tensor) -> Estimate:
    """sum(sums) / sum(counts) over sequences, with the delta-method standard error of that ratio:
    sqrt(m / (m - 1) * sum_i (s_i - R n_i)^2) / sum_i n_i for m sequences (NaN when m < 2 or no count)."""
    sums, counts = sums.double(), counts.double()
    total = float(counts.sum())
    if total == 0:
        return Estimate(float("nan"), float("nan"))
    ratio = float(sums.sum()) / total
    m = sums.numel()
    if m < 2:
        return Estimate(ratio, float("nan"))
    residual = sums - ratio * counts
    return Estimate(ratio, math.sqrt(m / (m - 1) * float((residual * residual).sum())) / total)


def mean_estimate(values: torch.Tensor) -> Estimate:
    """The mean of per-sequence values and its standard error sqrt(sample variance / m) (NaN when m < 2)."""
    values = values.double()
    m = values.numel()
    if m == 0:
        return Estimate(float("nan"), float("nan"))
    mean = float(values.mean())
    return Estimate(mean, float(values.std(correction=1)) / math.sqrt(m) if m >= 2 else float("nan"))


def sequence_kl_unavailable(replay) -> Optional[str]:
    """Why ``replay`` cannot give the sequence-level estimate, or None when it can."""
    has_field = getattr(replay, "sampled_logprobs", None) is not None or getattr(replay, "has_sampled_logprobs", False)
    if not has_field:
        return ("the buffer does not record the sampled tokens' log-probs (cache format v1, or a buffer built "
                "without them): regenerate it with this version")
    if replay.metadata.get("sampled_from_teacher") is not True:
        return ("the buffer's text was not sampled from the original model (a corpus cache, or unknown): "
                "log p_orig(x) - log p_model(x) over it does not estimate the KL")
    return None


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return int(batch_size)


@torch.no_grad()
def measure_forgetting(model, replay, *, batch_size: int = 8, temperature: float = 1.0, device=None,
                       progress: bool = True) -> ForgettingReport:
    """The drift of ``model`` from the model that generated ``replay``, on every sequence of ``replay``.

    Use sequences the model was never trained on (a held-out part of the buffer). ``replay``: a
    ``ReplayBuffer`` or ``ShardedReplayBuffer`` (read batch by batch, in order). ``temperature`` divides the
    model's logits, as ``ReplayKLLoss(temperature=...)`` does in training. ``device``: where the batches go
    (default: the model's parameters' device). The model runs in eval mode (dropout off) and is put back in
    the mode it was in.
    """
    from .replay_buffer import ReplayBuffer, ShardedReplayBuffer

    if not isinstance(replay, (ReplayBuffer, ShardedReplayBuffer)):
        raise TypeError(f"replay must be a ReplayBuffer or a ShardedReplayBuffer, got {type(replay).__name__}")
    batch_size = _check_batch_size(batch_size)
    _, weight, bias = lm_head_of(model)
    if replay.vocab_size != weight.shape[0]:
        raise ValueError(f"replay was recorded for a vocabulary of {replay.vocab_size} tokens, but the model's "
                         f"lm_head has {weight.shape[0]} rows")
    if device is None:
        device = weight.device
    from tqdm.auto import tqdm

    unavailable = sequence_kl_unavailable(replay)
    was_training = model.training
    model.eval()
    kl_sums, nll_sums, counts, sequence_kls = [], [], [], []
    try:
        batches = replay.batches(batch_size, shuffle=False, device=device)
        bar = tqdm(batches, total=replay.num_batches(batch_size), desc="measuring drift", unit="batch",
                   disable=not progress)
        for b in bar:
            hidden = last_hidden_states(model, b["input_ids"], b["attention_mask"])
            mask = b["mask"]
            # The sampled token at position j + 1 as a k = 1 teacher of position j: its KL is the model's NLL.
            following = torch.nn.functional.pad(b["input_ids"][:, 1:], (0, 1), value=-1)
            sampled = torch.where(mask, following, -1)[..., None]
            with skip_value_checks():  # a buffer's teacher is validated when it is loaded or opened
                kl = fused_replay_kl(hidden, weight, b["teacher_ids"], b["teacher_logprobs"], bias=bias, mask=mask,
                                     teacher_tail_logprob=b["teacher_tail_logprob"] if replay.mode == "tail" else None,
                                     mode=replay.mode, temperature=temperature, reduction="none")
                nll = fused_replay_kl(hidden, weight, sampled, torch.zeros(sampled.shape, device=device), bias=bias,
                                      mask=mask, temperature=temperature, reduction="none")
            kl_sums.append(kl.double().sum(-1).cpu())
            nll_sums.append(nll.double().sum(-1).cpu())
            counts.append(mask.sum(-1).cpu())
            if unavailable is None:  # log p_orig(x) - log p_model(x): cached log-prob + the model's NLL
                sampled = torch.where(mask, b["sampled_logprobs"].double(), 0.0)
                sequence_kls.append((sampled + torch.where(mask, nll.double(), 0.0)).sum(-1).cpu())
    finally:
        model.train(was_training)
    kl_sums, nll_sums, counts = (torch.cat(t) if t else torch.zeros(0) for t in (kl_sums, nll_sums, counts))
    sequence_kl = mean_estimate(torch.cat(sequence_kls) if sequence_kls else torch.zeros(0)) if unavailable is None else None
    return ForgettingReport(replay_kl=ratio_estimate(kl_sums, counts), replay_nll=ratio_estimate(nll_sums, counts),
                            num_sequences=int(counts.numel()), num_tokens=int(counts.sum()), mode=replay.mode,
                            sequence_kl=sequence_kl, sequence_kl_unavailable=unavailable)
