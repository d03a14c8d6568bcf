"""Drafters for speculative decoding: what a drafter may read (``DecodeState``), the ``Drafter``
interface, a draft model (``ModelDrafter``) and model-free n-gram drafts (``NGramDrafter``)."""

from __future__ import annotations

from typing import Optional

import torch

from ..model_info import model_config_hash, model_name
from .sampling import sample_categorical
from .slot_cache import make_slot_model

__all__ = ["DecodeState", "Drafter", "ModelDrafter", "NGramDrafter"]


class DecodeState:
    """What a drafter may read: per-slot token history and lengths, which slots are live."""

    def __init__(self, tokens, lengths, live, generator, temperature, max_len):
        self.tokens = tokens  # [B, max_len + 2] int64 (the last column is a write scratch)
        self.lengths = lengths  # [B] int64
        self.live = live  # [B] bool
        self.generator = generator
        self.temperature = temperature
        self.max_len = max_len


class Drafter:
    """Proposes draft tokens for speculative decoding. Subclass and implement :meth:`propose`.

    ``propose`` returns ``(tokens [B, K] int64, probs)`` where ``probs`` is the [B, K, V] float32
    distribution each token was drawn from, or ``None`` if the proposal is deterministic (a point
    mass on the proposed token). Exactness only requires that ``probs`` be the true proposal
    distribution; a poor drafter costs speed, never correctness.
    """

    def start(self, batch_size: int, max_len: int, vocab_size: int) -> None:
        """Called at the start of every shard with the slot count and maximum sequence length."""

    def reset(self, slots: torch.Tensor, max_prompt_len: int) -> None:
        """Slots (bool [B]) now hold new sequences whose prompts are at most ``max_prompt_len`` long."""

    def propose(self, state: DecodeState, num_tokens: int):
        raise NotImplementedError

    def commit(self, num_accepted: torch.Tensor, live: torch.Tensor) -> None:
        """After verification: ``num_accepted[b]`` leading drafts of live slot ``b`` were accepted."""

    def describe(self) -> dict:
        return {"type": type(self).__name__}


class ModelDrafter(Drafter):
    """Drafts with a smaller causal LM that shares the target's vocabulary, batched like the target."""

    def __init__(self, draft_model):
        self.model = draft_model
        self._slots = None  # the draft model's slot cache, per shard
        self._width = 1
        self._num_tokens = 0

    def start(self, batch_size, max_len, vocab_size):
        self._slots = make_slot_model(self.model, batch_size, max_len + 1)
        self._width = 1

    def reset(self, slots, max_prompt_len):
        self._slots.reset(slots)
        self._width = max(self._width, max_prompt_len)

    def propose(self, state, num_tokens):
        drafts, probs = [], []
        slots = self._slots
        extra = None  # the first feed takes the pending tokens, each later one the previous draft
        for i in range(num_tokens):
            width = self._width if i == 0 else 0
            logits = slots.feed(state.tokens, state.lengths, state.live, width, extra=extra, keep=1)[:, -1]
            q = torch.softmax(logits / state.temperature, dim=-1)
            token = sample_categorical(q, state.generator)
            drafts.append(token)
            probs.append(q)
            extra = token
        self._num_tokens = num_tokens
        return torch.cat(drafts, 1), torch.stack(probs, 1)

    def commit(self, num_accepted, live):
        # The draft cache holds d_1..d_{K-1} (d_K was sampled but never fed); keep the accepted ones.
        span = self._num_tokens - 1
        self._slots.rollback(span, num_accepted.clamp(max=span), live)
        # Pending next round: the bonus/correction token, plus d_K when everything was accepted.
        self._width = 2

    def describe(self):
        return {"type": "ModelDrafter", "model_name": model_name(self.model), "config_hash": model_config_hash(self.model)}


class NGramDrafter(Drafter):
    """Model-free drafts: find the latest earlier occurrence of the sequence's last n tokens (longest
    n in ``max_ngram..min_ngram`` first) and propose the tokens that followed it, continued
    periodically. Without any match it proposes the last token repeated. Runs on-device, batched."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        for name, value in (("max_ngram", max_ngram), ("min_ngram", min_ngram)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if min_ngram > max_ngram:
            raise ValueError(f"min_ngram ({min_ngram}) must be <= max_ngram ({max_ngram})")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, state, num_tokens):
        tokens, lengths = state.tokens, state.lengths
        B, width = tokens.shape[0], tokens.shape[1] - 1
        device = tokens.device
        history = tokens[:, :width]
        last = tokens.gather(1, (lengths - 1).clamp_min(0)[:, None])
        best_start = torch.full((B,), -1, dtype=torch.long, device=device)
        best_n = torch.zeros(B, dtype=torch.long, device=device)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            if n >= width:
                continue
            windows = history.unfold(1, n, 1)  # [B, W, n], window i = tokens i..i+n-1
            suffix_idx = (lengths[:, None] - n + torch.arange(n, device=device)[None, :]).clamp_min(0)
            suffix = history.gather(1, suffix_idx)
            starts = torch.arange(windows.shape[1], device=device)[None, :]
            # A match must end before the suffix starts' last token so something follows it.
            ok = (windows == suffix[:, None, :]).all(-1) & (starts < (lengths - n)[:, None])
            start = torch.where(ok, starts, -1).amax(1)
            take = (start >= 0) & (best_start < 0)
            best_start = torch.where(take, start, best_start)
            best_n = torch.where(take, n, best_n)
        found = best_start >= 0
        period = (lengths - best_n - best_start).clamp_min(1)
        j = torch.arange(num_tokens, device=device)[None, :]
        src = best_start[:, None] + best_n[:, None] + j % period[:, None]
        drafts = tokens.gather(1, src.clamp(0, width - 1))
        drafts = torch.where(found[:, None], drafts, last.expand(B, num_tokens))
        return drafts, None

    def describe(self):
        return {"type": "NGramDrafter", "max_ngram": self.max_ngram, "min_ngram": self.min_ngram}
