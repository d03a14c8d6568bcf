"""The slot cache for flash-attn models: many independent sequences in one HF ``DynamicCache``.

Every batch row ("slot") keeps a validity mask over the cache columns; flash-attn's 2D padding mask
lets each token see exactly its own sequence's columns. Finished sequences and rejected draft tokens
just become invalid columns, and the cache is compacted when it has grown to twice the longest live
sequence. Other attention implementations use the static per-slot cache of slot_cache.py, which needs
no compaction but a 4D mask, which flash-attn does not take.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..model_info import model_device_dtype
from .slot_cache import forward_parameters, forward_with_cache, pending_block

__all__ = ["CompactingSlotModel", "COMPACT_SLACK"]


# Extra cache columns tolerated before compaction (beyond twice the longest sequence).
COMPACT_SLACK = 64


class CompactingSlotModel:
    """The slot cache for flash-attn (which takes a 2D padding mask, not a 4D one): one growing HF
    ``DynamicCache`` whose rows hold independent sequences at independent positions.

    Invariants: ``valid[b]`` marks the cache columns of slot ``b``'s current sequence, in order;
    ``processed[b]`` is how many of its tokens the cache holds (= ``valid[b].sum()``), i.e. the next
    token to feed is ``tokens[b, processed[b]]``. A fed token that is not *real* (a dead slot or ragged
    padding) attends only to itself and its column is invalid at once, so it can never influence
    anything (and never produces NaN: every query row sees at least one key).
    """

    def __init__(self, model, batch_size: int, max_len: int):
        from transformers import DynamicCache

        self.model = model
        self.device, self.dtype = model_device_dtype(model)
        self.batch_size = batch_size
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.processed = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # Compact once the cache is twice as long as any sequence can be: amortized O(1) per column.
        self.compact_at = 2 * max_len + COMPACT_SLACK
        self.flash = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
        self.keeps_logits = "logits_to_keep" in forward_parameters(model)
        self._checked_layers = False
        self._arange_cache = torch.arange(max_len + 64, device=self.device)
        # Draft tokens past a sequence's budget are verified but never kept; their positions may run past
        # the model's position table (GPT-2's learned positions would fail), so clamp them.
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self.max_position = int(max_positions) - 1 if isinstance(max_positions, int) else None

    def reset(self, slots: torch.Tensor, slot_indices=None) -> None:
        """Forget the sequences in ``slots`` (bool [B]); their columns become free garbage."""
        self.valid &= ~slots[:, None]
        self.processed.masked_fill_(slots, 0)

    def _arange(self, n: int) -> torch.Tensor:
        if n > self._arange_cache.numel():
            self._arange_cache = torch.arange(2 * n, device=self.device)
        return self._arange_cache[:n]

    def step(self, token, lengths, live):
        """One plain decode step (see ``SlotModel.step``), through the general ``feed``."""
        return self.feed(None, lengths, live, 1, keep=1, pending=token)[:, -1]

    def feed(self, tokens_buf, lengths, live, width: int, extra: Optional[torch.Tensor] = None, keep: int = 1,
             pending: Optional[torch.Tensor] = None):
        """Run the model on each live slot's unprocessed tokens plus optional ``extra`` tokens.

        ``width`` bounds ``lengths - processed`` over live slots (a host-side int, so no sync);
        each slot's pending tokens are right-aligned in a block of that width, ragged rows padded
        with non-real tokens. ``extra`` [B, E] are tentative tokens (drafts) appended after them.
        Returns float32 logits [B, keep, V] for the last ``keep`` block columns.
        """
        arange = self._arange(width + (extra.shape[1] if extra is not None else 0))
        tokens, real, positions, processed = pending_block(tokens_buf, lengths, self.processed, live, width, extra,
                                                           arange, pending)
        n = tokens.shape[1]
        if self.max_position is not None:
            positions = positions.clamp(max=self.max_position)

        if self.flash:
            # flash-attn takes a 2D padding mask and unpads queries and keys with it; its bottom-right
            # causal alignment over the unpadded keys is exactly "valid past columns, then the real
            # block tokens in order", so holes and ragged padding are handled without a 4D mask.
            # Dead slots keep their (ignored) block tokens as keys so that no query has an empty key set.
            # Not exercised by the CPU test suite: verify on a CUDA machine with flash_attn installed.
            attention_mask = torch.cat([self.valid, real | ~live[:, None]], 1).long()
        else:
            past = self.valid[:, None, :] & real[:, :, None]  # [B, n, T]
            ar = self._arange(n)
            causal = ar[None, :] <= ar[:, None]  # [n, n] key <= query
            own = (causal[None] & real[:, None, :] & real[:, :, None]) | (ar[None, :] == ar[:, None])[None]
            allowed = torch.cat([past, own], 2)
            attention_mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            attention_mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            attention_mask = attention_mask[:, None]
        kwargs = {}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = keep
        out = forward_with_cache(self.model, self.cache, tokens, attention_mask, positions, **kwargs)
        if not self._checked_layers:
            self._check_cache_layers()
        self.valid = torch.cat([self.valid, real], 1)
        self.processed = processed
        logits = out.logits[:, -keep:]
        if self.valid.shape[1] >= self.compact_at:
            self.compact()
        return logits.float()

    def _check_cache_layers(self):
        from transformers.cache_utils import DynamicLayer

        for layer in self.cache.layers:
            # Sliding-window layers drop columns on their own, which would desynchronize `valid`.
            if type(layer) is not DynamicLayer:
                raise NotImplementedError(
                    f"generate_replay supports models whose KV cache is a plain DynamicLayer per layer, got "
                    f"{type(layer).__name__} (sliding-window or hybrid attention)"
                )
        self._checked_layers = True

    def rollback(self, span: int, keep: torch.Tensor, live: torch.Tensor) -> None:
        """Invalidate, per live slot, the last ``span - keep[b]`` of the last ``span`` cache columns
        (the rejected draft tokens)."""
        # A live slot keeps all its draft columns through a compaction, so a compaction in the feed
        # can leave fewer than `span` columns only when no slot is live: then there is nothing to drop.
        span = min(span, self.valid.shape[1])
        if span == 0:
            return
        drop = (self._arange(span)[None, :] >= keep[:, None]) & live[:, None]
        self.valid[:, -span:] &= ~drop
        self.processed -= drop.sum(1)

    def compact(self) -> None:
        """Gather each slot's valid columns to the right end of a shorter cache."""
        counts = self.valid.sum(1)
        width = max(int(counts.max()), 1)  # host sync; happens once per ~max_len decode steps
        total = self.valid.shape[1]
        # Stable sort on the validity flag: invalid columns first, valid ones after in their order.
        order = torch.sort(self.valid.to(torch.int8), dim=1, stable=True).indices[:, total - width :]
        self.valid = self.valid.gather(1, order)
        for layer in self.cache.layers:
            if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
                continue
            b, h, _, d = layer.keys.shape
            index = order[:, None, :, None].expand(b, h, width, d)
            layer.keys = layer.keys.gather(2, index)
            vd = layer.values.shape[-1]
            layer.values = layer.values.gather(2, order[:, None, :, None].expand(b, layer.values.shape[1], width, vd))
