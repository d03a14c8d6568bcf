"""The slot cache: many independent sequences, each at its own positions, in one static KV cache.

Batch row ("slot") ``b`` of every layer's keys and values holds one sequence, its position ``p`` in
column ``p + 1``; column 0 is a write scratch for tokens that must not be remembered (dead slots,
ragged padding). A custom 4D mask lets a token at position ``p`` see columns ``1..p + 1`` of its own
row, and a non-real token only column 0. A refilled slot simply overwrites its row from column 1 on
and rejected draft tokens are overwritten by the next ones, so nothing is ever compacted or copied:
a decode step writes one column per layer where a growing ``DynamicCache`` copies the whole cache.
flash-attn takes no 4D mask: it gets the compacting ``DynamicCache`` of slot_cache_compacting.py.
``check_slot_attention`` verifies once that a model honors all of this.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Optional, Sequence

import torch

from ..model_info import model_device_dtype, output_vocab_size

__all__ = ["SlotModel", "SlotKVCache", "SlotModelPool", "make_slot_model", "check_slot_attention", "forward_parameters",
           "forward_with_cache", "pending_block"]


def forward_parameters(model) -> set:
    """Names of the keyword arguments ``model.forward`` takes: a PEFT wrapper's are its base model's, and
    a subclass whose ``forward(*args, **kwargs)`` passes everything on takes its parents' too."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    names = set()
    for cls in type(model).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        params = inspect.signature(forward).parameters
        names |= set(params)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break  # it takes no more than these
    return names


def forward_with_cache(model, cache, tokens, attention_mask, positions, **kwargs):
    """``model(...)`` with ``cache`` under the name this transformers takes: ``cache`` since 5.2x
    (``past_key_values`` is then deprecated and warns), ``past_key_values`` before."""
    name = "cache" if "cache" in forward_parameters(model) else "past_key_values"
    out = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                **{name: cache}, **kwargs)
    returned = out["cache"] if "cache" in out else out.get("past_key_values")
    if returned is not cache:
        raise RuntimeError("the model did not update the KV cache it was given; it cannot be used by generate_replay")
    return out


_TIGHT_SLACK = 3  # columns a tight layout holds beyond the window (see SlotKVCache)


# transformers' SDPA attention (5.2x) folds the query heads of a grouped-query model into the query length
# when it is given a mask, because CUDA's masked GQA falls back to the math kernel; it passes the mask
# with SDPA's enable_gqa instead when this variable is "1".
_FORCE_MASKED_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def _uses_grouped_query_sdpa(model, device) -> bool:
    """Whether ``model`` runs transformers' SDPA attention with fewer key/value heads than query heads on
    the CPU: there, with the slot cache's mask, folded query heads take about twice as long as SDPA's own
    grouped-query path (measured: 512 slots, head dim 32, 1 key/value head of 2; 1.2x the whole decode loop)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    return (device.type == "cpu" and getattr(config, "_attn_implementation", None) == "sdpa"
            and isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads < heads)


@contextlib.contextmanager
def _masked_grouped_query_sdpa(enabled: bool):
    """During one forward: transformers' SDPA takes the grouped-query path with the mask (the same
    attention, a faster CPU kernel). A value the user set is left alone, and the variable is restored after."""
    if not enabled or _FORCE_MASKED_GQA in os.environ:
        yield
        return
    os.environ[_FORCE_MASKED_GQA] = "1"
    try:
        yield
    finally:
        os.environ.pop(_FORCE_MASKED_GQA, None)


def pending_block(tokens_buf, lengths, processed, live, width: int, extra, arange, pending=None):
    """The block a feed runs: each slot's pending tokens right-aligned in ``width`` columns (ragged rows
    padded with non-real tokens; ``pending`` [B, width] instead of gathering them from ``tokens_buf``),
    then ``extra`` [B, E]. -> (tokens, real, positions [B, n], processed after the feed [B])."""
    B = lengths.shape[0]
    tok_parts, real_parts, pos_parts = [], [], []
    if width > 0:
        idx = lengths[:, None] - width + arange[:width][None, :]
        real = (idx >= processed[:, None]) & live[:, None]
        idx = idx.clamp_min(0)
        tok_parts.append(pending if pending is not None else tokens_buf.gather(1, idx))
        real_parts.append(real)
        pos_parts.append(idx)
        processed = torch.where(live, lengths, processed)
    if extra is not None:
        num_extra = extra.shape[1]
        tok_parts.append(extra)
        real_parts.append(live[:, None].expand(B, num_extra))
        pos_parts.append(processed[:, None] + arange[:num_extra][None, :])
        processed = processed + live.long() * num_extra
    tokens = torch.cat(tok_parts, 1) if len(tok_parts) > 1 else tok_parts[0]
    real = torch.cat(real_parts, 1) if len(real_parts) > 1 else real_parts[0]
    positions = torch.cat(pos_parts, 1) if len(pos_parts) > 1 else pos_parts[0]
    return tokens, real, positions, processed


def _cache_base():
    from transformers import DynamicCache

    return DynamicCache


class SlotKVCache(_cache_base()):
    """Static per-slot keys and values [B, H, S, D] per layer (a ``DynamicCache`` to the model's eyes).

    Before each forward ``prepare`` sets the column each fed token writes and the window of columns
    attention reads; ``update`` (called by every attention layer) writes the new keys and values
    there and returns the window, a view: no per-step allocation.

    ``tight_window`` (the CPU): each layer's storage is laid out with only ``_TIGHT_SLACK`` columns beyond
    the window (S = window .. window + slack, not the whole cache), re-laid into a spare buffer when the
    window outgrows that or shrinks well below it (every slack + 1 plain steps, one copy of the window).
    CPU SDPA reads a window whose rows are far apart in memory (S much larger than the window) at up to
    half the speed of a compact one (measured, 512 slots x 4 heads x head dim 32, fp32: 3.07 ms against
    1.31 ms at a 64-column window in a 131-column cache; a slack of 3 columns costs 0.1 ms, 6 costs all of
    it). GPU kernels take strided windows at full speed and CUDA graphs want fixed addresses: static there.
    """

    def __init__(self, batch_size: int, num_columns: int, device, tight_window: bool = False):
        super().__init__()
        self.layers = []
        self.flat_keys, self.flat_values = [], []  # per layer: storage for num_columns columns
        self.slot_keys, self.slot_values = [], []  # per layer: [B, H, capacity, D] views of that storage
        self.spare_keys = self.spare_values = None  # one re-layout target, shared by the layers in turn
        self.num_columns = num_columns
        self.tight_window = tight_window
        self.capacity = num_columns  # columns of the layout the next forward uses
        self.rows = torch.arange(batch_size, device=device)[:, None]  # [B, 1], for the column writes
        self.columns = None  # [B, n] write column of each fed token
        self.window = 0  # columns [0, window) are attended this forward

    def prepare(self, columns: torch.Tensor, window: int) -> None:
        self.columns = columns
        self.window = window
        if self.tight_window and not window <= self.capacity <= window + _TIGHT_SLACK:
            self.capacity = min(self.num_columns, window + _TIGHT_SLACK)

    @staticmethod
    def _view(flat: torch.Tensor, like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return flat[: b * h * capacity * d].view(b, h, capacity, d)

    def _relayout(self, layer_idx: int) -> None:
        """Copy the layer's first columns into the spare buffer laid out for ``capacity`` columns; the
        layer's old storage becomes the spare. Columns past the old layout are zeroed (attention masks
        them, but a masked value must be finite: its weight 0 times NaN is NaN)."""
        keys, values = self.slot_keys[layer_idx], self.slot_values[layer_idx]
        kept = min(keys.shape[2], self.capacity)
        new_keys = self._view(self.spare_keys, keys, self.capacity)
        new_values = self._view(self.spare_values, values, self.capacity)
        new_keys[:, :, :kept].copy_(keys[:, :, :kept])
        new_values[:, :, :kept].copy_(values[:, :, :kept])
        if kept < self.capacity:
            new_keys[:, :, kept:].zero_()
            new_values[:, :, kept:].zero_()
        self.spare_keys, self.flat_keys[layer_idx] = self.flat_keys[layer_idx], self.spare_keys
        self.spare_values, self.flat_values[layer_idx] = self.flat_values[layer_idx], self.spare_values
        self.slot_keys[layer_idx], self.slot_values[layer_idx] = new_keys, new_values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == len(self.slot_keys):  # lazily allocated: heads, head dim and dtype come from the model
            b, h, _, d = key_states.shape
            size = b * h * self.num_columns
            self.flat_keys.append(key_states.new_zeros(size * d))
            self.flat_values.append(value_states.new_zeros(size * value_states.shape[3]))
            if self.tight_window and self.spare_keys is None:
                self.spare_keys, self.spare_values = torch.zeros_like(self.flat_keys[0]), torch.zeros_like(
                    self.flat_values[0])
            self.slot_keys.append(self._view(self.flat_keys[-1], key_states, self.capacity))
            self.slot_values.append(self._view(self.flat_values[-1], value_states, self.capacity))
        elif self.slot_keys[layer_idx].shape[2] != self.capacity:
            self._relayout(layer_idx)
        keys, values = self.slot_keys[layer_idx], self.slot_values[layer_idx]
        # [B, n] row/column pairs, heads and head dim sliced: the value is [B, n, H, D]
        keys[self.rows, :, self.columns] = key_states.transpose(1, 2)
        values[self.rows, :, self.columns] = value_states.transpose(1, 2)
        return keys[:, :, : self.window], values[:, :, : self.window]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.window


class SlotModel:
    """A causal LM whose batch rows ("slots") hold independent sequences at independent positions.

    Invariants: ``processed[b]`` is how many of slot ``b``'s tokens the cache holds (its columns
    ``1..processed[b]``), i.e. the next token to feed is ``tokens[b, processed[b]]``. A fed token that
    is not *real* (a dead slot or ragged padding) writes the scratch column 0 and attends only to it,
    so it can never influence anything (and never produces NaN: every query row sees one key).
    ``max_len`` bounds the positions whose outputs are used; draft tokens past it are verified but
    never kept, and share the last column.
    """

    def __init__(self, model, batch_size: int, max_len: int, tight_window: Optional[bool] = None):
        self.model = model
        self.device, self.dtype = model_device_dtype(model)
        self.batch_size = batch_size
        self.max_len = max_len
        self.num_columns = max_len + 2  # scratch, one per position, one for the positions past max_len
        if tight_window is None:
            tight_window = self.device.type == "cpu"
        self.cache = SlotKVCache(batch_size, self.num_columns, self.device, tight_window=tight_window)
        self.restart()
        self.keeps_logits = "logits_to_keep" in forward_parameters(model)
        # SDPA takes a boolean mask as it is; eager attention adds the mask to the scores.
        self.bool_mask = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self.masked_gqa = _uses_grouped_query_sdpa(model, self.device)
        self._ar = torch.arange(self.num_columns + 64, device=self.device)
        self._ar4 = {}  # window -> arange [1, 1, 1, window]: the plain step's mask, without a per-step slice
        # restart() sets: _step_views, (lengths, live) -> their [B, 1] and [B, 1, 1, 1] views; _stale,
        # processed = lengths - 1 for live slots, not yet written (see `step`).
        # Draft tokens past a sequence's budget are verified but never kept; their positions may run past
        # the model's position table (GPT-2's learned positions would fail), so clamp them.
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self.max_position = int(max_positions) - 1 if isinstance(max_positions, int) else None

    def restart(self) -> None:
        """Forget every slot's sequence (a new shard): the cache's storage stays allocated and is
        overwritten, so a shard after the first touches no fresh memory (on the CPU, first-touch page faults
        of the whole cache cost about 0.4 s per shard at 512 slots of 131 columns on a 4-layer model)."""
        self.processed = torch.zeros(self.batch_size, dtype=torch.long, device=self.device)
        # Host side, so the attention window needs no sync: `fed` counts the columns every forward may
        # have added to any slot, `reset_at[b]` its value when slot b was last reset; no slot holds more
        # than `high` = fed - min(reset_at) cached tokens. Slots refilled together (the usual case without
        # EOS) bring the window back to their own length instead of the whole cache's.
        self.fed = 0
        self.reset_at = [0] * self.batch_size
        self._oldest_reset = 0
        self._step_views = None
        self._stale = False

    def _materialize(self) -> None:
        if self._stale:
            lengths, live = self._step_views[0], self._step_views[1]
            self.processed = torch.where(live, lengths - 1, self.processed)
            self._stale = False

    @property
    def high(self) -> int:
        return self.fed - self._oldest_reset

    def reset(self, slots: torch.Tensor, slot_indices: Optional[Sequence[int]] = None) -> None:
        """Forget the sequences in ``slots`` (bool [B]): their rows are overwritten from column 1 on.
        ``slot_indices``: the same slots as host ints, which lets the attention window shrink (without
        them it stays as wide as before: an upper bound either way)."""
        self._materialize()
        self.processed.masked_fill_(slots, 0)
        if slot_indices is not None:
            for b in slot_indices:
                self.reset_at[b] = self.fed
            self._oldest_reset = min(self.reset_at)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.bool_mask:
            return allowed
        return torch.where(allowed, 0.0, torch.finfo(self.dtype).min).to(self.dtype)

    def _forward(self, tokens, allowed, positions, columns, keep):
        window = min(self.num_columns, self.high + 1)
        self.cache.prepare(columns, window)
        kwargs = {"logits_to_keep": keep} if self.keeps_logits else {}
        with _masked_grouped_query_sdpa(self.masked_gqa):
            return forward_with_cache(self.model, self.cache, tokens, self._mask(allowed), positions, **kwargs)

    def step(self, token: torch.Tensor, lengths: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        """One plain decode step: every live slot has exactly one pending token, ``token[b]`` ([B, 1]) at
        position ``lengths[b] - 1``. Returns the logits [B, V] (a fresh model output, float32 or the
        model's dtype). The shortest path: the mask is two comparisons against the positions.

        ``lengths`` and ``live`` must be the same tensors from step to step, updated in place."""
        views = self._step_views
        if views is None or views[0] is not lengths or views[1] is not live:
            B = self.batch_size
            views = self._step_views = (lengths, live, lengths.view(B, 1), lengths.view(B, 1, 1, 1),
                                        live.view(B, 1, 1, 1))
        _, _, lengths2, lengths4, live4 = views
        self.fed += 1
        window = min(self.num_columns, self.high + 1)
        ar4 = self._ar4.get(window)
        if ar4 is None:
            ar4 = self._ar4[window] = self._ar[:window].view(1, 1, 1, window)
        columns4 = torch.where(live4, lengths4, 0)  # position + 1, or the scratch
        allowed = (ar4 <= columns4) & (ar4 >= live4)  # live: columns 1..p + 1; dead: column 0
        out = self._forward(token, allowed, lengths2 - 1, columns4.view(-1, 1), 1)
        self._stale = True  # for live slots processed is now lengths - 1 (lengths grows after the step)
        logits = out.logits[:, -1]
        return logits if logits.dtype == torch.float32 else logits.float()

    def feed(self, tokens_buf, lengths, live, width: int, extra: Optional[torch.Tensor] = None, keep: int = 1):
        """Run the model on each live slot's unprocessed tokens plus optional ``extra`` tokens.

        ``width`` bounds ``lengths - processed`` over live slots (a host-side int, so no sync);
        each slot's pending tokens are right-aligned in a block of that width, ragged rows padded
        with non-real tokens. ``extra`` [B, E] are tentative tokens (drafts) appended after them.
        Returns float32 logits [B, keep, V] for the last ``keep`` block columns.
        """
        self._materialize()
        tokens, real, positions, processed = pending_block(tokens_buf, lengths, self.processed, live, width, extra,
                                                           self._ar)
        self.fed += width + (extra.shape[1] if extra is not None else 0)
        columns = torch.where(real, (positions + 1).clamp_max(self.num_columns - 1), 0)  # [B, n]
        if self.max_position is not None:
            positions = positions.clamp(max=self.max_position)
        window = min(self.num_columns, self.high + 1)
        ar = self._ar[:window]
        allowed = (ar <= columns[:, :, None]) & (ar >= real[:, :, None])  # [B, n, window]
        out = self._forward(tokens, allowed[:, None], positions, columns, keep)
        self.processed = processed
        return out.logits[:, -keep:].float()

    def rollback(self, span: int, keep: torch.Tensor, live: torch.Tensor) -> None:
        """Forget, per live slot, the last ``span - keep[b]`` of its last ``span`` cached tokens (the
        rejected draft tokens): the next tokens fed overwrite their columns."""
        self._materialize()
        if span == 0:
            return
        drop = (self._ar[:span][None, :] >= keep[:, None]) & live[:, None]
        self.processed = self.processed - drop.sum(1)


def make_slot_model(model, batch_size: int, max_len: int):
    """The slot cache for ``model``: the static one, or for flash-attn (no 4D masks) the compacting one."""
    if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
        from .slot_cache_compacting import CompactingSlotModel

        return CompactingSlotModel(model, batch_size, max_len)
    return SlotModel(model, batch_size, max_len)


class SlotModelPool:
    """Holds the last static slot cache of one ``generate_replay`` call, so that the next shard of the same
    shape restarts it instead of allocating (and, on the CPU, page-faulting) a new one. One at a time: a
    shape change frees the held cache before the new one is allocated, so the peak stays one cache."""

    def __init__(self):
        self._held: Optional[SlotModel] = None

    def get(self, model, batch_size: int, max_len: int):
        held = self._held
        if held is not None and held.model is model and held.batch_size == batch_size and held.max_len == max_len:
            held.restart()
            return held
        self._held = None
        slots = make_slot_model(model, batch_size, max_len)
        if isinstance(slots, SlotModel):
            self._held = slots
        return slots


def check_slot_attention(model, *, name: str = "model") -> None:
    """Verify once that ``model`` honors the slot cache: custom attention masks, explicit position ids,
    ragged blocks, refills and rolled-back columns must give the logits of a plain forward pass.

    An architecture that ignores a custom mask or position ids (e.g. ALiBi models that rebuild their
    bias from a 2D mask) would otherwise produce silently wrong samples and teachers. Costs five small
    forward passes. Raises NotImplementedError on a mismatch.
    """
    vocab = output_vocab_size(model)
    device, dtype = model_device_dtype(model)
    t = [(3 + 7919 * i) % vocab for i in range(10)]
    slots = make_slot_model(model, 2, 8)
    buf = torch.zeros(2, 9, dtype=torch.long, device=device)
    live = torch.ones(2, dtype=torch.bool, device=device)
    try:
        # step 1: ragged prefill, slot 0 feeds 3 tokens, slot 1 one token (two padding columns)
        buf[0, :3] = torch.tensor(t[0:3])
        buf[1, :1] = torch.tensor(t[3:4])
        lengths = torch.tensor([3, 1], device=device)
        step1 = slots.feed(buf, lengths, live, 3, keep=3)
        # step 2: two tentative tokens each; slot 0 keeps one, slot 1 none (rolled-back columns)
        step2 = slots.feed(buf, lengths, live, 0, extra=torch.tensor([[t[4], t[6]], [t[5], t[7]]], device=device),
                           keep=2)
        slots.rollback(2, torch.tensor([1, 0], device=device), live)
        # step 3: one new token each after the kept ones, the plain decode step's path
        buf[0, 3:5] = torch.tensor([t[4], t[8]])
        buf[1, 1:2] = torch.tensor([t[9]])
        step3 = slots.step(torch.tensor([[t[8]], [t[9]]], device=device), torch.tensor([5, 2], device=device),
                           live)[:, None].float()
    except Exception as exc:  # e.g. a model that builds its own mask from the cache's length
        raise NotImplementedError(
            f"{name} ({type(model).__name__}) does not reproduce its plain forward pass under generate_replay's "
            f"slot cache: it failed with {type(exc).__name__}: {exc}"
        ) from exc
    ref0 = model(input_ids=torch.tensor([[t[0], t[1], t[2], t[4], t[8]]], device=device)).logits[0].float()
    ref1 = model(input_ids=torch.tensor([[t[3], t[9]]], device=device)).logits[0].float()
    ref1b = model(input_ids=torch.tensor([[t[3], t[5]]], device=device)).logits[0].float()
    pairs = [
        (step1[0], ref0[0:3]), (step2[0, 0], ref0[3]), (step3[0, 0], ref0[4]),
        (step1[1, 2], ref1[0]), (step2[1, 0], ref1b[1]), (step3[1, 0], ref1[1]),
    ]
    scale = max(float(ref0.abs().max()), 1.0)
    tolerance = (1e-3 if dtype in (torch.float32, torch.float64) else 5e-2) * scale
    worst = max(float((a - b).abs().max()) for a, b in pairs)
    if not worst <= tolerance:
        raise NotImplementedError(
            f"{name} ({type(model).__name__}, attn_implementation="
            f"{getattr(model.config, '_attn_implementation', None)!r}) does not reproduce its plain forward pass "
            f"under generate_replay's slot cache (max logit difference {worst:.3g} > {tolerance:.3g}): the "
            "architecture ignores custom attention masks or position ids. Try attn_implementation='sdpa'."
        )
