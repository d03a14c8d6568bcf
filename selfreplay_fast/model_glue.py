"""Glue between Hugging Face causal LMs and ``fused_replay_kl``: no full-logit tensor in a training step.

A causal LM's logits are ``lm_head(base_model(input_ids).last_hidden_state)``. Everything here runs the
base model only and hands its last hidden states plus the lm_head weight (and bias) to
``fused_replay_kl``, which never materializes more than one chunk of logits:

* :func:`lm_head_of`: (base model, lm_head weight, bias) of a model, PEFT-wrapped or not.
* :func:`last_hidden_states`: the base model's output, never the lm_head.
* :func:`task_nll`: the next-token cross-entropy, as ``fused_replay_kl`` against a k = 1 teacher (the
  label, log-probability 0): for that teacher the tail-mode KL is exactly the cross-entropy.
* :class:`ReplayKLLoss`: KL(cached teacher || model) on a ``ReplayBuffer.batches`` batch; with
  ``loss="nll"`` the plain next-token loss on the replay text instead (no teacher needed), with
  ``loss="kl+nll"`` a convex mix of the two.
* :func:`replay_step`: both, and their weighted sum.

Heads: a plain ``nn.Linear`` lm_head, tied to the input embedding or not (a tied weight is the same
Parameter, so its gradient from the fused KL and from the embedding add up as autograd would), under
PEFT (``PeftModel``: the LoRA layers inside the base model apply as usual; an lm_head listed in
``modules_to_save`` uses the active adapter's copy). Refused with an error that says so: a LoRA-adapted
lm_head (leave ``lm_head`` out of ``target_modules``; merging ``B A`` into the weight would be wrong
under LoRA dropout), heads whose logits are not ``hidden @ W.T + b`` (``final_logit_softcapping``,
``logit_scale``, ``logits_scaling``: ``NotImplementedError``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Mapping, NamedTuple, Optional

import torch

from ._inputs import (
    IMPLS,
    MODES,
    _check_choice,
    check_chunk_size,
    check_temperature,
    skip_value_checks,
    value_checks_enabled,
)
from ._weight_grad_share import loss_term, shared_weight_grad
from .replay_kl import fused_replay_kl

__all__ = [
    "lm_head_of",
    "last_hidden_states",
    "task_nll",
    "check_task_targets",
    "ReplayKLLoss",
    "ReplayStepLosses",
    "replay_step",
    "check_replay_weight",
    "REPLAY_LOSSES",
]

# What ReplayKLLoss trains on: the cached teacher, the replay text alone (Bansal & Sanghavi's context-free
# sampling baseline: only input_ids needed), or (1 - nll_weight) * KL + nll_weight * NLL.
REPLAY_LOSSES = ("kl", "nll", "kl+nll")


def _unwrap_peft(model):
    """The transformers model inside a ``peft.PeftModel`` (LoRA layers stay injected), else ``model``."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def _check_plain_logits(config) -> None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for cfg in {id(config): config, id(text): text}.values():
        softcap = getattr(cfg, "final_logit_softcapping", None)
        if softcap:
            raise NotImplementedError(
                f"the model applies final_logit_softcapping={softcap} to its logits: not supported yet "
                "(the fused losses assume logits = hidden @ lm_head.weight.T + bias)"
            )
        for name in ("logit_scale", "logits_scaling"):
            scale = getattr(cfg, name, None)
            if scale not in (None, 1, 1.0):
                raise NotImplementedError(
                    f"the model scales its logits ({name}={scale}): not supported yet "
                    "(the fused losses assume logits = hidden @ lm_head.weight.T + bias)"
                )


def _resolve_head(head):
    """The nn.Linear that computes the logits, through PEFT's wrappers where that is exact."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils import ModulesToSaveWrapper
    except ImportError:  # peft not installed: no PEFT wrappers can occur
        return head
    if isinstance(head, BaseTunerLayer):
        raise NotImplementedError(
            f"the lm_head is adapted by PEFT ({type(head).__module__}.{type(head).__name__}): not supported. "
            "Leave 'lm_head' out of the LoRA target_modules (a frozen lm_head costs no weight-gradient work), "
            "or train it fully with modules_to_save=['lm_head']"
        )
    if isinstance(head, ModulesToSaveWrapper):
        active = head.active_adapters
        if getattr(head, "disable_adapters", False) or not active:
            return head.original_module
        if len(active) != 1 or active[0] not in head.modules_to_save:
            raise NotImplementedError(f"the lm_head has several active modules_to_save adapters {active}: not supported")
        return head.modules_to_save[active[0]]
    return head


def lm_head_of(model):
    """(base model, lm_head weight, lm_head bias) of a Hugging Face causal LM, or a PEFT model around one.

    The base model maps ``input_ids`` to the last hidden states (final norm included); the logits are
    ``hidden @ weight.T + bias``. Raises NotImplementedError for heads that are not that (logit scaling,
    final-logit softcapping, a LoRA-adapted lm_head) and TypeError for models without an nn.Linear head.
    """
    inner = _unwrap_peft(model)
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "get_output_embeddings"):
        raise TypeError(f"model must be a Hugging Face causal LM (or a PEFT model around one), got {type(model).__name__}")
    _check_plain_logits(config)
    head = _resolve_head(inner.get_output_embeddings())
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"model's output embeddings must be an nn.Linear lm_head, got {type(head).__name__}")
    base = getattr(inner, inner.base_model_prefix, None)
    if base is None:
        raise TypeError(f"model {type(inner).__name__} has no base model under {inner.base_model_prefix!r}")
    return base, head.weight, head.bias


def _head_after_forward(model):
    """(weight, bias) of the lm_head, read after the base model's forward (where FSDP2 has unsharded the group of
    the final norm, which holds the lm_head when accelerate shards the model). A frozen head that is still a
    sharded DTensor then (its FSDP2 group has no module that ran, e.g. under PEFT) is all-gathered here; a
    trainable one is left to ``fused_replay_kl``, which refuses it (its gradient would skip FSDP2's reduction)."""
    _, weight, bias = lm_head_of(model)
    if hasattr(weight, "full_tensor") and not weight.requires_grad:
        weight = weight.full_tensor()
        if bias is not None and hasattr(bias, "full_tensor") and not bias.requires_grad:
            bias = bias.full_tensor()
    return weight, bias


def last_hidden_states(model, input_ids, attention_mask=None):
    """[B, L, D] last hidden states of ``model``'s base model (final norm included), without the lm_head.

    Runs with ``use_cache=False``; gradient checkpointing, PEFT adapters and autocast apply as in the
    model's own forward."""
    base, _, _ = lm_head_of(model)
    return base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _check_num_items(num_items):
    """The divisor of a summed loss: ``num_items`` clamped to at least 1.

    A count of 0 is legitimate (an accumulation window without a counted token, e.g. short sequences under
    completion-only masking): the sum is then 0 too, and 0 / 1 keeps that window's term at 0 where 0 / 0
    would send NaN into every parameter. A tensor count is clamped on its device (no host sync)."""
    if num_items is None:
        return None
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items.shape)}")
        return num_items.reshape(()).clamp_min(1)
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real) or not num_items >= 0:
        raise ValueError(f"num_items_in_batch must be None, a number >= 0 or a scalar tensor, got {num_items!r}")
    return max(num_items, 1)


def _next_token_targets(input_ids, attention_mask, labels, ignore_index):
    """(target [B, L-1], counted [B, L-1] bool or None): what position j predicts, and whether it counts."""
    if labels is not None:
        target = labels[:, 1:]
        return target, target != ignore_index
    if attention_mask is not None:
        return input_ids[:, 1:], attention_mask[:, 1:].bool()
    return input_ids[:, 1:], None


def _bad_target_flag(input_ids, attention_mask, labels, vocab_size, ignore_index) -> torch.Tensor:
    """0-dim bool tensor on the batch's device: some counted target lies outside [0, vocab_size)."""
    target, counted = _next_token_targets(input_ids, attention_mask, labels, ignore_index)
    bad = (target < 0) | (target >= vocab_size)
    return (bad if counted is None else bad & counted).any()


def check_task_targets(input_ids, attention_mask, labels, vocab_size: int, ignore_index: int = -100) -> None:
    """Raise ValueError if a counted next-token target of a task batch is not a row of the lm_head.

    The value check of :func:`task_nll` (one host sync for tensors on a GPU). ``ReplayTrainer`` checks
    each accumulation window at once, with one sync, and its training steps then skip it."""
    if bool(_bad_target_flag(input_ids, attention_mask, labels, vocab_size, ignore_index)):
        what = "labels" if labels is not None else "input_ids"
        raise ValueError(f"{what}: expected ids in [0, {vocab_size}) (the lm_head's rows)"
                         + (f" or ignore_index={ignore_index}" if labels is not None else ""))


def task_nll(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    *,
    position_ids=None,
    model_kwargs: Optional[Mapping] = None,
    ignore_index: int = -100,
    num_items_in_batch=None,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: Optional[int] = None,
):
    """Next-token negative log-likelihood of ``model`` on a batch, without full logits.

    As Hugging Face computes ``model(input_ids, labels=labels).loss``: position j predicts ``labels[:, j+1]``
    and labels equal to ``ignore_index`` do not count. Without ``labels`` they are ``input_ids`` with the
    padding (``attention_mask == 0``) ignored; with ``labels`` the attention mask is not consulted for them
    (as in Hugging Face: set padded labels to ``ignore_index``).

    reduction: "mean" over counted tokens (0 when none count), "sum" or "none" ([B, L-1], 0 where not
    counted). ``num_items_in_batch`` (Trainer's count over a whole gradient-accumulation window): the sum
    divided by it instead of the mean (by at least 1: a window without counted tokens contributes 0). Counted labels outside the vocabulary raise ValueError (one host
    sync, skipped under ``skip_value_checks()``).

    position_ids ([B, L]) and model_kwargs (more keyword arguments of the base model's forward, e.g. the
    ``cu_seq_lens_*`` of flash attention) go to the base model: packed, padding-free rows (position ids restarting
    at 0 per sequence, no attention mask) then attend within each sequence only. The target of a sequence's last
    token is the next sequence's first: its label must be ``ignore_index`` (TRL's padding-free collator does that).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, L] integer tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must hold at least 2 positions to predict a next token, got {tuple(input_ids.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must be an integer tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {getattr(labels, 'shape', type(labels))}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask))}")
    if position_ids is not None and (not isinstance(position_ids, torch.Tensor) or position_ids.shape[-1] != input_ids.shape[1]):
        raise ValueError(f"position_ids must be a tensor of [B, L] = {tuple(input_ids.shape)} positions, "
                         f"got {getattr(position_ids, 'shape', type(position_ids))}")
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a dict of the base model's keyword arguments or None, "
                        f"got {type(model_kwargs).__name__}")
    num_items = _check_num_items(num_items_in_batch)
    if num_items is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch replaces the mean: use it with reduction='mean', got {reduction!r}")
    extra = dict(model_kwargs or {})
    if position_ids is not None:
        extra["position_ids"] = position_ids

    base, weight, bias = lm_head_of(model)
    target, counted = _next_token_targets(input_ids, attention_mask, labels, ignore_index)
    if value_checks_enabled():  # one host sync; the k = 1 teacher built below is valid by construction
        check_task_targets(input_ids, attention_mask, labels, weight.shape[0], ignore_index)
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).last_hidden_state[:, :-1]
    # Read after the base model ran: FSDP2 registers the unsharded lm_head weight only once its group's forward
    # started (before, the attribute is the sharded DTensor).
    weight, bias = _head_after_forward(model)
    teacher_ids = (target if counted is None else torch.where(counted, target, -1))[..., None]
    logprobs = torch.zeros(teacher_ids.shape, dtype=torch.float32, device=teacher_ids.device)
    kwargs = dict(bias=bias, mask=counted, impl=impl, chunk_size=chunk_size)
    with skip_value_checks():
        if num_items is None:
            return fused_replay_kl(hidden, weight, teacher_ids, logprobs, reduction=reduction, **kwargs)
        # The sum enters a weighted sum of fused losses (ReplayTrainer) divided by num_items: say so to a
        # weight-gradient share (_weight_grad_share.py), which the division outside fused_replay_kl hides.
        with loss_term(divisor=num_items):
            total = fused_replay_kl(hidden, weight, teacher_ids, logprobs, reduction="sum", **kwargs)
    return total / num_items


_REPLAY_KEYS = ("input_ids", "attention_mask", "teacher_ids", "teacher_logprobs", "mask")


class ReplayKLLoss(torch.nn.Module):
    """KL(cached teacher || model) on a replay batch (a dict of ``ReplayBuffer.batches``), no full logits.

    ``forward(model, replay_batch, num_items=None)``: the base model's hidden states at every position of
    the batch (unshifted: row j is the teacher for token j + 1) go to ``fused_replay_kl`` with the lm_head.
    ``num_items``: divide the sum by it instead of taking the mean (a gradient-accumulation window).
    Arguments as in ``fused_replay_kl``; ``mode="tail"`` uses the batch's ``teacher_tail_logprob``.

    ``loss``: ``"kl"`` (the default, above); ``"nll"``: the next-token negative log-likelihood of the replay
    text under ``softmax(logits / temperature)``, no teacher (the batch needs only ``input_ids``; its
    ``mask`` says which tokens count, the ones the original model sampled, else its ``attention_mask``,
    else every next token); ``"kl+nll"``: ``(1 - nll_weight) * KL + nll_weight * NLL``, both over the same
    tokens, from one forward of the base model. The NLL is ``fused_replay_kl`` against a k = 1 teacher
    (the sampled token, log-probability 0), as in ``task_nll``.
    """

    def __init__(self, mode: str = "tail", temperature: float = 1.0, impl: str = "auto",
                 chunk_size: Optional[int] = None, reduction: str = "mean", *, loss: str = "kl",
                 nll_weight: float = 0.5):
        super().__init__()
        _check_choice("mode", mode, MODES)
        _check_choice("impl", impl, IMPLS)
        _check_choice("reduction", reduction, ("mean", "sum", "none"))
        _check_choice("loss", loss, REPLAY_LOSSES)
        self.mode = mode
        self.temperature = check_temperature(temperature)
        self.impl = impl
        self.chunk_size = check_chunk_size(chunk_size)
        self.reduction = reduction
        self.loss = loss
        self.nll_weight = _check_nll_weight(nll_weight)

    def extra_repr(self) -> str:
        text = (f"mode={self.mode!r}, temperature={self.temperature}, impl={self.impl!r}, "
                f"chunk_size={self.chunk_size}, reduction={self.reduction!r}")
        if self.loss != "kl":
            text += f", loss={self.loss!r}" + (f", nll_weight={self.nll_weight}" if self.loss == "kl+nll" else "")
        return text

    def _required_keys(self):
        if self.loss == "nll":
            return ["input_ids"]
        return list(_REPLAY_KEYS) + (["teacher_tail_logprob"] if self.mode == "tail" else [])

    def forward(self, model, replay_batch: Mapping[str, torch.Tensor], num_items=None):
        if not isinstance(replay_batch, Mapping):
            raise TypeError(f"replay_batch must be a dict of ReplayBuffer.batches, got {type(replay_batch).__name__}")
        missing = [k for k in self._required_keys() if k not in replay_batch]
        if missing:
            raise KeyError(f"replay_batch lacks {missing} (expected a batch of ReplayBuffer.batches)")
        num_items = _check_num_items(num_items)
        if num_items is not None and self.reduction != "mean":
            raise ValueError(f"num_items replaces the mean: use it with reduction='mean', got {self.reduction!r}")
        with loss_term(divisor=num_items) if num_items is not None else contextlib.nullcontext():
            loss = self._loss(model, replay_batch, num_items)
        return loss / num_items if num_items is not None else loss

    def _loss(self, model, b, num_items):
        base, weight, bias = lm_head_of(model)
        hidden = base(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False).last_hidden_state
        weight, bias = _head_after_forward(model)  # as in task_nll (FSDP2's unsharded weight)
        reduction = "sum" if num_items is not None else self.reduction
        common = dict(bias=bias, temperature=self.temperature, reduction=reduction, impl=self.impl,
                      chunk_size=self.chunk_size)
        if self.loss == "nll":
            loss = self._nll(hidden, weight, b, common)
        else:
            tail = b["teacher_tail_logprob"] if self.mode == "tail" else None

            def kl():
                return fused_replay_kl(hidden, weight, b["teacher_ids"], b["teacher_logprobs"], mask=b["mask"],
                                       teacher_tail_logprob=tail, mode=self.mode, **common)

            if self.loss == "kl":
                loss = kl()
            else:  # only the mix is returned: its two fused losses can share one weight gradient
                with shared_weight_grad():
                    with loss_term(1.0 - self.nll_weight):
                        kl_loss = kl()
                    with loss_term(self.nll_weight):
                        nll = self._nll(hidden, weight, b, common)
                loss = (1.0 - self.nll_weight) * kl_loss + self.nll_weight * nll
        return loss

    @staticmethod
    def _nll(hidden, weight, batch, common):
        """The replay text's next-token NLL: row j against the token at j + 1 as a k = 1 teacher."""
        input_ids = batch["input_ids"]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"replay_batch['input_ids'] must be a [B, L] integer tensor, "
                             f"got {getattr(input_ids, 'shape', type(input_ids))}")
        following = torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=-1)
        counted = _replay_counted(batch)
        teacher_ids = (following if counted is None else torch.where(counted, following, -1))[..., None]
        logprobs = torch.zeros(teacher_ids.shape, dtype=torch.float32, device=teacher_ids.device)
        return fused_replay_kl(hidden, weight, teacher_ids, logprobs, mask=counted, **common)


def _replay_counted(batch) -> Optional[torch.Tensor]:
    """[B, L] bool: the positions whose next token the replay NLL counts (None: all but the last)."""
    input_ids = batch["input_ids"]
    mask = batch.get("mask")
    if mask is not None:
        return mask.bool()
    attention = batch.get("attention_mask")
    if attention is None:
        counted = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    else:  # position j counts when it and the token it predicts are both real tokens
        attention = attention.bool()
        counted = attention & torch.nn.functional.pad(attention[:, 1:], (0, 1), value=False)
    counted[:, -1] = False
    return counted


def _check_nll_weight(nll_weight) -> float:
    if isinstance(nll_weight, bool) or not isinstance(nll_weight, numbers.Real):
        raise TypeError(f"nll_weight must be a number in [0, 1], got {type(nll_weight).__name__}")
    nll_weight = float(nll_weight)
    if not 0.0 <= nll_weight <= 1.0:
        raise ValueError(f"nll_weight must be a number in [0, 1] (the NLL's share of loss='kl+nll'), got {nll_weight}")
    return nll_weight


def check_replay_weight(replay_weight) -> float:
    if isinstance(replay_weight, bool) or not isinstance(replay_weight, numbers.Real):
        raise TypeError(f"replay_weight must be a real number >= 0, got {type(replay_weight).__name__}")
    replay_weight = float(replay_weight)
    if not math.isfinite(replay_weight) or replay_weight < 0:
        raise ValueError(f"replay_weight must be a finite number >= 0, got {replay_weight}")
    return replay_weight


class ReplayStepLosses(NamedTuple):
    """``loss = task_loss + replay_weight * replay_kl``: call ``loss.backward()``; ``task_loss`` and
    ``replay_kl`` are detached values (for logging)."""

    task_loss: torch.Tensor
    replay_kl: torch.Tensor
    loss: torch.Tensor


def replay_step(model, task_batch: Mapping[str, torch.Tensor], replay_batch: Mapping[str, torch.Tensor],
                replay_weight: float, *, replay_loss: Optional[ReplayKLLoss] = None) -> ReplayStepLosses:
    """Losses of one training step, without full logits anywhere: (task_loss, replay_kl, loss).

    task_batch: dict with ``input_ids`` [B, L] and optionally ``attention_mask`` and ``labels`` (see
    :func:`task_nll`). replay_batch: a batch of ``ReplayBuffer.batches`` on the model's device.
    replay_loss: the :class:`ReplayKLLoss` to use (default: tail mode, temperature 1), or one of
    ``REPLAY_LOSSES`` as a string (``"nll"``, ``"kl+nll"``: that loss with the other defaults). The
    ``replay_kl`` field of the result is then that replay loss. The caller runs ``loss.backward()`` (or
    scales it first) and the optimizer step; ``task_loss`` and ``replay_kl`` come detached, because their
    fused losses share one precomputed lm_head weight gradient, which is exact for the sum only
    (_weight_grad_share.py: one [V, D] gradient held, not one per loss).
    """
    weight = check_replay_weight(replay_weight)
    if not isinstance(task_batch, Mapping) or "input_ids" not in task_batch:
        raise TypeError("task_batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels')")
    if replay_loss is None:
        replay_loss = ReplayKLLoss()
    elif isinstance(replay_loss, str):
        _check_choice("replay_loss", replay_loss, REPLAY_LOSSES)
        replay_loss = ReplayKLLoss(loss=replay_loss)
    elif not isinstance(replay_loss, ReplayKLLoss):
        raise TypeError(f"replay_loss must be a ReplayKLLoss, one of {REPLAY_LOSSES} or None, "
                        f"got {type(replay_loss).__name__}")
    with shared_weight_grad():
        task = task_nll(model, task_batch["input_ids"], task_batch.get("attention_mask"), task_batch.get("labels"),
                        impl=replay_loss.impl, chunk_size=replay_loss.chunk_size)
        with loss_term(weight):
            kl = replay_loss(model, replay_batch)
    return ReplayStepLosses(task.detach(), kl.detach(), task + weight * kl)
