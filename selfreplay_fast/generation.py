"""Replay generation: sample from the frozen model and record its own top-k teacher on the way.

``generate_replay`` runs its own decode loop over a Hugging Face causal LM (never ``model.generate``,
so no generation_config default such as ``top_k=50`` can truncate the distribution):

* **Batched with continuous batching.** ``batch_size`` slots decode together; when a sequence ends
  (EOS or ``max_new_tokens``) its slot is refilled with the next sequence at once, so the batch stays
  full. Every slot keeps its own positions inside one shared ``DynamicCache``: a per-slot validity mask
  over cache columns says which columns belong to the slot's current sequence, and a custom 4D
  attention mask lets each token see exactly those columns (plus the earlier tokens of its own block).
  Columns of finished sequences and rejected draft tokens simply become invalid; the cache is
  compacted (valid columns of each slot gathered to the right) whenever it has grown to twice the
  longest live sequence, so memory stays bounded.
* **Exact sampling** from ``softmax(logits / temperature)`` over the full vocabulary, and at every
  sampled position the top-k ids/log-probs of *that* distribution plus the log of the remaining mass,
  computed stably as ``logsumexp(non-top-k logits) - logsumexp(all logits)``.
* **Speculative decoding** (``draft_model=`` or ``drafter=NGramDrafter()``): batched, each slot accepts
  its own number of draft tokens. Acceptance is standard rejection sampling (accept with probability
  ``min(1, p/q)``, on rejection resample from ``normalize(max(p - q, 0))``, a bonus token when all are
  accepted), so the output follows the target distribution exactly; the teacher rows come from the
  target's verification logits.
* **Sharded, resumable output.** Sequences are generated shard by shard; shard ``s`` draws all its
  randomness from a ``torch.Generator`` seeded from ``(seed, s)`` and starts from an empty batch, so
  its content does not depend on earlier shards. With ``out_dir`` each finished shard is written
  atomically and listed in ``metadata.json``; rerunning with the same arguments skips the listed
  shards and produces exactly what an uninterrupted run produces (same device and software assumed:
  kernels differ between CPU and GPU).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import numbers
import os
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable, List, Optional, Sequence, Union

import torch

from ._inputs import check_temperature
from .replay_buffer import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    ReplayBuffer,
    ShardedBufferWriter,
)

__all__ = [
    "generate_replay",
    "GenerationStats",
    "Drafter",
    "ModelDrafter",
    "NGramDrafter",
    "load_model_for_generation",
    "pick_attn_implementation",
    "model_config_hash",
]


# --------------------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------------------


def pick_attn_implementation(device) -> str:
    """``"flash_attention_2"`` when flash_attn imports and ``device`` is CUDA, else ``"sdpa"``."""
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
        except Exception:  # not installed, or built for another torch/CUDA
            return "sdpa"
        return "flash_attention_2"
    return "sdpa"


def load_model_for_generation(path: str, *, device="cpu", dtype=None, attn_implementation: Optional[str] = None):
    """Load a frozen causal LM for :func:`generate_replay`: eval mode, on ``device``, with flash
    attention 2 where available (CUDA and ``flash_attn`` importable), else PyTorch SDPA.

    ``dtype`` defaults to bfloat16 on CUDA and float32 on the CPU.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = attn_implementation or pick_attn_implementation(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


def _canonical_config(config) -> dict:
    # Fields that change with how a model was loaded (path, dtype, attention kernel, library version)
    # rather than with what it computes are left out, so a reload gets the same hash.
    data = config.to_dict()
    volatile = {"transformers_version", "torch_dtype", "dtype", "use_cache", "name_or_path"}
    return {key: value for key, value in data.items() if key not in volatile and not key.startswith("_")}


def model_config_hash(model) -> str:
    """sha256 of the model's config (load-time fields removed): identifies the architecture + vocab."""
    text = json.dumps(_canonical_config(model.config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _model_device_dtype(model):
    param = next(model.parameters())
    return param.device, param.dtype


def _token_id_list(value) -> List[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _first_id(*candidates) -> Optional[int]:
    for value in candidates:
        ids = _token_id_list(value)
        if ids:
            return ids[0]
    return None


_SAMPLE_BLOCK = 256


def sample_categorical(probs: torch.Tensor, generator: torch.Generator, num_samples: int = 1) -> torch.Tensor:
    """Draw ``num_samples`` ids (with replacement) per row of ``probs`` [..., V] by inverse CDF.

    ``torch.multinomial`` costs ~8x more on the CPU, and one float32 cumsum over a large vocabulary
    accumulates rounding (and is itself slow). So this is two-level: pick a block of 256 ids from the
    block totals (accumulated in float64), then the id inside the chosen block from its float32 cumsum.
    Rows need not be normalized. Zero-probability ids are never drawn: a draw lands on id ``i`` iff
    ``cdf[i-1] <= u < cdf[i]``, and a ``u`` that rounding puts past the block's cumsum is clamped to the
    block's last id with positive mass.
    """
    lead, vocab = probs.shape[:-1], probs.shape[-1]
    rows = probs.reshape(-1, vocab).float()
    num_rows = rows.shape[0]
    pad = (-vocab) % _SAMPLE_BLOCK
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    num_blocks = rows.shape[1] // _SAMPLE_BLOCK
    blocks = rows.view(num_rows, num_blocks, _SAMPLE_BLOCK)
    outer = blocks.sum(-1, dtype=torch.float64).cumsum(-1)  # [R, nb]
    u = torch.rand(num_rows, num_samples, generator=generator, dtype=torch.float64, device=rows.device)
    u = u * outer[:, -1:]
    block = torch.searchsorted(outer, u, right=True).clamp_max(num_blocks - 1)  # [R, n]
    before = torch.where(block > 0, outer.gather(1, (block - 1).clamp_min(0)), 0.0)
    rest = (u - before).float()
    block_cdf = blocks.gather(1, block[:, :, None].expand(num_rows, num_samples, _SAMPLE_BLOCK)).cumsum(-1)
    offset = torch.searchsorted(block_cdf, rest[:, :, None], right=True)[:, :, 0]
    last_positive = (block_cdf < block_cdf[:, :, -1:]).sum(-1)
    ids = block * _SAMPLE_BLOCK + torch.minimum(offset, last_positive)
    return ids.reshape(*lead, num_samples)


def _shard_seed(seed: int, shard_index: int) -> int:
    digest = hashlib.sha256(f"selfreplay-fast:{seed}:{shard_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------
# Slot cache: many independent sequences in one HF DynamicCache
# --------------------------------------------------------------------------------------------------


# Extra cache columns tolerated before compaction (beyond twice the longest sequence).
_COMPACT_SLACK = 64


class _SlotModel:
    """A causal LM whose batch rows ("slots") hold independent sequences at independent positions.

    Invariants: ``valid[b]`` marks the cache columns of slot ``b``'s current sequence, in order;
    ``processed[b]`` is how many of its tokens the cache holds (= ``valid[b].sum()``), i.e. the next
    token to feed is ``tokens[b, processed[b]]``. A fed token that is not *real* (a dead slot or ragged
    padding) attends only to itself and its column is invalid at once, so it can never influence
    anything (and never produces NaN: every query row sees at least one key).
    """

    def __init__(self, model, batch_size: int, max_len: int):
        from transformers import DynamicCache

        self.model = model
        self.device, self.dtype = _model_device_dtype(model)
        self.batch_size = batch_size
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=self.device)
        self.processed = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        # Compact once the cache is twice as long as any sequence can be: amortized O(1) per column.
        self.compact_at = 2 * max_len + _COMPACT_SLACK
        self.flash = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._checked_layers = False
        self._arange_cache = torch.arange(max_len + 64, device=self.device)
        # Draft tokens past a sequence's budget are verified but never kept; their positions may run past
        # the model's position table (GPT-2's learned positions would fail), so clamp them.
        max_positions = getattr(model.config, "max_position_embeddings", None)
        self.max_position = int(max_positions) - 1 if isinstance(max_positions, int) else None

    def reset(self, slots: torch.Tensor) -> None:
        """Forget the sequences in ``slots`` (bool [B]); their columns become free garbage."""
        self.valid &= ~slots[:, None]
        self.processed.masked_fill_(slots, 0)

    def _arange(self, n: int) -> torch.Tensor:
        if n > self._arange_cache.numel():
            self._arange_cache = torch.arange(2 * n, device=self.device)
        return self._arange_cache[:n]

    def feed(self, tokens_buf, lengths, live, width: int, extra: Optional[torch.Tensor] = None, keep: int = 1):
        """Run the model on each live slot's unprocessed tokens plus optional ``extra`` tokens.

        ``width`` bounds ``lengths - processed`` over live slots (a host-side int, so no sync);
        each slot's pending tokens are right-aligned in a block of that width, ragged rows padded
        with non-real tokens. ``extra`` [B, E] are tentative tokens (drafts) appended after them.
        Returns float32 logits [B, keep, V] for the last ``keep`` block columns.
        """
        B = self.batch_size
        tok_parts, real_parts, pos_parts = [], [], []
        processed = self.processed
        if width > 0:
            idx = lengths[:, None] - width + self._arange(width)[None, :]
            real = (idx >= processed[:, None]) & live[:, None]
            idx = idx.clamp_min(0)
            tok_parts.append(tokens_buf.gather(1, idx))
            real_parts.append(real)
            pos_parts.append(idx)
            processed = torch.where(live, lengths, processed)
        if extra is not None:
            num_extra = extra.shape[1]
            tok_parts.append(extra)
            real_parts.append(live[:, None].expand(B, num_extra))
            pos_parts.append(processed[:, None] + self._arange(num_extra)[None, :])
            processed = processed + live.long() * num_extra
        tokens = torch.cat(tok_parts, 1) if len(tok_parts) > 1 else tok_parts[0]
        real = torch.cat(real_parts, 1) if len(real_parts) > 1 else real_parts[0]
        positions = torch.cat(pos_parts, 1) if len(pos_parts) > 1 else pos_parts[0]
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
        out = self.model(
            input_ids=tokens, attention_mask=attention_mask, position_ids=positions,
            past_key_values=self.cache, use_cache=True, **kwargs,
        )
        if out.past_key_values is not self.cache:
            raise RuntimeError("the model did not update the DynamicCache it was given; it cannot be used by generate_replay")
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


def check_slot_attention(model, *, name: str = "model") -> None:
    """Verify once that ``model`` honors the slot cache: custom attention masks, explicit position ids,
    ragged blocks, refills and rolled-back columns must give the logits of a plain forward pass.

    An architecture that ignores a custom mask or position ids (e.g. ALiBi models that rebuild their
    bias from a 2D mask) would otherwise produce silently wrong samples and teachers. Costs five small
    forward passes. Raises NotImplementedError on a mismatch.
    """
    vocab = _vocab_size(model)
    device, dtype = _model_device_dtype(model)
    t = [(3 + 7919 * i) % vocab for i in range(10)]
    slots = _SlotModel(model, 2, 8)
    buf = torch.zeros(2, 9, dtype=torch.long, device=device)
    live = torch.ones(2, dtype=torch.bool, device=device)
    # step 1: ragged prefill, slot 0 feeds 3 tokens, slot 1 one token (two padding columns)
    buf[0, :3] = torch.tensor(t[0:3])
    buf[1, :1] = torch.tensor(t[3:4])
    lengths = torch.tensor([3, 1], device=device)
    step1 = slots.feed(buf, lengths, live, 3, keep=3)
    # step 2: two tentative tokens each; slot 0 keeps one, slot 1 none (holes in the cache)
    step2 = slots.feed(buf, lengths, live, 0, extra=torch.tensor([[t[4], t[6]], [t[5], t[7]]], device=device), keep=2)
    slots.rollback(2, torch.tensor([1, 0], device=device), live)
    # step 3: one new token each after the kept ones
    buf[0, 3:5] = torch.tensor([t[4], t[8]])
    buf[1, 1:2] = torch.tensor([t[9]])
    step3 = slots.feed(buf, torch.tensor([5, 2], device=device), live, 1, keep=1)
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


# --------------------------------------------------------------------------------------------------
# Drafters
# --------------------------------------------------------------------------------------------------


class _DecodeState:
    """What a drafter may read: per-slot token history and lengths, which slots are live."""

    def __init__(self, tokens, lengths, live, generator, temperature, max_len):
        self.tokens = tokens  # [B, max_len + 1] int64 (last column is a write scratch)
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

    def propose(self, state: _DecodeState, num_tokens: int):
        raise NotImplementedError

    def commit(self, num_accepted: torch.Tensor, live: torch.Tensor) -> None:
        """After verification: ``num_accepted[b]`` leading drafts of live slot ``b`` were accepted."""

    def describe(self) -> dict:
        return {"type": type(self).__name__}


class ModelDrafter(Drafter):
    """Drafts with a smaller causal LM that shares the target's vocabulary, batched like the target."""

    def __init__(self, draft_model):
        self.model = draft_model
        self._slots: Optional[_SlotModel] = None
        self._width = 1
        self._num_tokens = 0

    def start(self, batch_size, max_len, vocab_size):
        self._slots = _SlotModel(self.model, batch_size, max_len + 1)
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
        return {"type": "ModelDrafter", "model_name": _model_name(self.model), "config_hash": model_config_hash(self.model)}


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


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class GenerationStats:
    """Counters of one ``generate_replay`` call (shards skipped on resume are not counted)."""

    sequences: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    target_forwards: int = 0
    draft_proposed: int = 0
    draft_accepted: int = 0
    host_checks: int = 0  # decode steps that waited for the device to look for finished sequences

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> Optional[float]:
        """Fraction of proposed draft tokens accepted (None without speculative decoding)."""
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else None

    def add(self, other: "GenerationStats") -> None:
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        d["acceptance_rate"] = self.acceptance_rate
        return d


# --------------------------------------------------------------------------------------------------
# The decode engine (one shard)
# --------------------------------------------------------------------------------------------------


class _Rows:
    """Rows of the sampling distribution ``softmax(logits / temperature)``, computed in few passes.

    ``weights = exp(z - max z)`` are the unnormalized probabilities (the sampler takes them as they
    are), ``total`` their sum, so ``p = weights / total`` and ``lse = max + log(total)``. The top-k
    come from one ``topk`` over the logits (whose first value is the max, for free).
    """

    def __init__(self, logits: torch.Tensor, temperature: float, k: int):
        # `logits` is a fresh model output that nothing else reads, so it is overwritten in place:
        # a new [B, V] tensor per step would cost an allocation (and page faults on the CPU) per pass.
        z = logits.float()
        if temperature != 1.0:
            z = z.div_(temperature)
        self.top_z, self.top_ids = z.topk(k, dim=-1)
        shift = self.top_z[..., :1]
        self.weights = z.sub_(shift).exp_()
        self.total = self.weights.sum(-1)
        self.shift = shift[..., 0]
        self.lse = self.shift + self.total.log()


class _Recorder:
    """Turns rows of the sampling distribution into teacher rows (top-k + tail, or sampled)."""

    def __init__(self, k: int, sampled_draws: Optional[int]):
        self.k = k
        self.sampled_draws = sampled_draws
        # top-k mode needs the k largest logits; sampled mode only the max (to shift the exponentials).
        self.top = k if sampled_draws is None else 1

    def __call__(self, rows: _Rows, generator):
        """-> ids [..., k] int32, logprobs [..., k] float32, tail [...]. Consumes ``rows.weights``
        (overwritten in place), so call it after all sampling from ``rows``."""
        if self.sampled_draws is None:
            logprobs = rows.top_z - rows.lse[..., None]
            # Tail mass = sum of the non-top-k probabilities, summed directly (no 1 - sum p cancellation):
            # this is logsumexp over the non-top-k logits minus the full LSE, shifted by the row max. It
            # is exact to float32 rounding down to a tail of ~1e-37 of the top probability, and -inf below
            # (and when k = V), where the tail's contribution to any KL is < 1e-35.
            rest = rows.weights.scatter_(-1, rows.top_ids, 0.0).sum(-1)
            tail = (rest / rows.total).log()
            return rows.top_ids.int(), logprobs, tail
        lead, vocab = rows.weights.shape[:-1], rows.weights.shape[-1]
        weights = rows.weights.reshape(-1, vocab)
        draws = sample_categorical(weights, generator, self.sampled_draws)
        counts = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
        counts.scatter_add_(1, draws, torch.ones(draws.shape, dtype=torch.float32, device=weights.device))
        values, ids = counts.topk(self.k, dim=-1)
        used = values > 0
        n = float(self.sampled_draws)
        logprobs = torch.where(used, (values / n).log(), 0.0)
        ids = torch.where(used, ids, -1)
        dropped = (n - values.sum(-1)) / n  # draws of ids that did not fit in k slots
        tail = torch.where(dropped > 0, dropped.clamp_min(1e-30).log(), float("-inf"))
        return ids.int().reshape(*lead, self.k), logprobs.reshape(*lead, self.k), tail.reshape(lead)


def _correction_distribution(p: torch.Tensor, q: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Distribution of the token emitted after the accepted drafts (rows [B, V], need not be normalized).

    After a rejection it is ``normalize(max(p - q, 0))``, the residual that makes speculative sampling
    exact; when every draft was accepted it is the bonus distribution ``p`` itself.
    """
    residual = (p - q * rejected[:, None]).clamp_min(0)
    # The residual mass is 0 only if p == q exactly, where a rejection has probability 0: fall back to p.
    return torch.where(residual.sum(1, keepdim=True) > 0, residual, p)


class _ShardEngine:
    def __init__(self, *, model, prompts, max_new_tokens, batch_size, temperature, recorder, eos_ids, vocab_size,
                 drafter, num_draft_tokens, generator, check_every, progress_update):
        self.model = model
        self.prompts = prompts  # list of lists of ints, in sequence order
        self.max_new_tokens = max_new_tokens
        self.batch_size = min(batch_size, len(prompts))
        self.temperature = temperature
        self.recorder = recorder
        self.vocab_size = vocab_size
        self.drafter = drafter
        self.num_draft_tokens = num_draft_tokens
        self.generator = generator
        self.check_every = check_every
        self.progress_update = progress_update
        self.device, _ = _model_device_dtype(model)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device) if eos_ids else None
        self.max_len = max(len(p) for p in prompts) + max_new_tokens
        self.stats = GenerationStats()

    def _is_eos(self, tokens):
        if self.eos is None:
            return torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        return torch.isin(tokens, self.eos)

    def run(self):
        B, L, k, dev = self.batch_size, self.max_len, self.recorder.k, self.device
        scratch = L  # write target for rows that must not be recorded (dead slots, past the end)
        self.tokens = torch.zeros(B, L + 1, dtype=torch.long, device=dev)
        self.t_ids = torch.full((B, L + 1, k), -1, dtype=torch.int32, device=dev)
        self.t_lp = torch.zeros(B, L + 1, k, dtype=torch.float32, device=dev)
        self.t_tail = torch.full((B, L + 1), float("-inf"), dtype=torch.float32, device=dev)
        self.lengths = torch.ones(B, dtype=torch.long, device=dev)
        self.generated = torch.zeros(B, dtype=torch.long, device=dev)
        self.live = torch.zeros(B, dtype=torch.bool, device=dev)
        self.holds = torch.zeros(B, dtype=torch.bool, device=dev)  # slot holds a not yet harvested sequence
        self.slot_seq = [-1] * B  # which sequence each slot holds (host side), -1 = none
        self.results = [None] * len(self.prompts)
        self.next_seq = 0
        self.slot_ids = torch.arange(B, device=dev)  # for indexing one entry per slot
        self.scratch = scratch
        self.target = _SlotModel(self.model, B, L + 1)
        if self.drafter is not None:
            self.drafter.start(B, L, self.vocab_size)
        self.state = _DecodeState(self.tokens, self.lengths, self.live, self.generator, self.temperature, L)
        self._proposed = torch.zeros((), dtype=torch.long, device=dev)
        self._accepted = torch.zeros((), dtype=torch.long, device=dev)

        start = time.perf_counter()
        self.step = 0
        # Host side: the step by which every sequence loaded so far has surely ended (each decode step adds
        # at least one token to a live sequence; the last one loaded ends last), so that the last
        # sequences need no check every step.
        self.deadline = 0
        width = self._refill([True] * B)
        while True:
            if self.drafter is None:
                self._plain_step(width)
            else:
                self._speculative_step(width)
            self.stats.target_forwards += 1
            self.step += 1
            width = 1
            # Checks cost a host sync (the device stops running ahead of Python): every check_every steps
            # while sequences wait for a slot; once none wait, finished slots only need collecting, so
            # also once the deadline has passed, never every step.
            tail = self.next_seq >= len(self.prompts)
            if self.step % self.check_every == 0 or (tail and self.step >= self.deadline):
                self.stats.host_checks += 1
                done_list = (self.holds & ~self.live).tolist()  # the host sync of this step
                if any(done_list):
                    width = self._harvest_and_refill(done_list)
                if all(s < 0 for s in self.slot_seq):
                    break
        self.stats.seconds = time.perf_counter() - start
        self.stats.draft_proposed = int(self._proposed)
        self.stats.draft_accepted = int(self._accepted)
        return self.results

    # -- slot management --------------------------------------------------------------------------

    def _refill(self, free_list) -> int:
        """Load the next sequences into the free slots. Returns the prefill width they need."""
        refill = []
        for b, is_free in enumerate(free_list):
            if is_free and self.next_seq < len(self.prompts):
                refill.append((b, self.next_seq))
                self.next_seq += 1
        if not refill:
            return 1
        self.deadline = self.step + self.max_new_tokens
        slots = torch.zeros(self.batch_size, dtype=torch.bool, device=self.device)
        slot_index = torch.tensor([b for b, _ in refill], device=self.device)
        slots[slot_index] = True
        max_prompt = max(len(self.prompts[s]) for _, s in refill)
        prompt_block = torch.zeros(len(refill), self.max_len + 1, dtype=torch.long)
        prompt_lengths = []
        for i, (b, s) in enumerate(refill):
            prompt = self.prompts[s]
            prompt_block[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            prompt_lengths.append(len(prompt))
            self.slot_seq[b] = s
        self.tokens[slot_index] = prompt_block.to(self.device)
        self.t_ids[slot_index] = -1
        self.t_lp[slot_index] = 0.0
        self.t_tail[slot_index] = float("-inf")
        self.lengths[slot_index] = torch.tensor(prompt_lengths, device=self.device)
        self.generated[slot_index] = 0
        self.live[slot_index] = True
        self.holds[slot_index] = True
        self.target.reset(slots)
        if self.drafter is not None:
            self.drafter.reset(slots, max_prompt)
        return max_prompt

    def _harvest_and_refill(self, done_list) -> int:
        finished = [b for b, d in enumerate(done_list) if d]
        index = torch.tensor(finished, device=self.device)
        self.holds[index] = False
        lengths = self.lengths[index].cpu()
        tokens = self.tokens[index].cpu()
        ids = self.t_ids[index].cpu()
        lp = self.t_lp[index].cpu()
        tail = self.t_tail[index].cpu()
        new_tokens = 0
        for i, b in enumerate(finished):
            n = int(lengths[i])
            seq = self.slot_seq[b]
            self.results[seq] = (tokens[i, :n].clone(), ids[i, :n].clone(), lp[i, :n].clone(), tail[i, :n].clone())
            new_tokens += n - len(self.prompts[seq])
            self.slot_seq[b] = -1
        self.stats.sequences += len(finished)
        self.stats.generated_tokens += new_tokens
        if self.progress_update is not None:
            self.progress_update(len(finished), new_tokens, self)
        return self._refill(done_list)

    # -- one decode step --------------------------------------------------------------------------

    def _record(self, row_index: torch.Tensor, rows: _Rows):
        """Write teacher rows: ``row_index`` [B] or [B, C] (scratch for rows not to keep)."""
        ids, values, tail = self.recorder(rows, self.generator)
        slot_ids = self.slot_ids if row_index.dim() == 1 else self.slot_ids[:, None].expand_as(row_index)
        self.t_ids[slot_ids, row_index] = ids
        self.t_lp[slot_ids, row_index] = values
        self.t_tail[slot_ids, row_index] = tail

    def _plain_step(self, width: int):
        live = self.live
        logits = self.target.feed(self.tokens, self.lengths, live, width, keep=1)[:, -1]
        rows = _Rows(logits, self.temperature, self.recorder.top)
        token = sample_categorical(rows.weights, self.generator)[:, 0]
        self._record(torch.where(live, self.lengths - 1, self.scratch), rows)
        self.tokens[self.slot_ids, torch.where(live, self.lengths, self.scratch)] = token
        step = live.long()
        self.lengths += step
        self.generated += step
        finished = live & (self._is_eos(token) | (self.generated >= self.max_new_tokens))
        self.live &= ~finished

    def _speculative_step(self, width: int):
        K = self.num_draft_tokens
        B, V = self.batch_size, self.vocab_size
        live = self.live
        drafts, q = self.drafter.propose(self.state, K)  # [B, K], [B, K, V] or None
        logits = self.target.feed(self.tokens, self.lengths, live, width, extra=drafts, keep=K + 1)
        rows = _Rows(logits, self.temperature, self.recorder.top)  # [B, K+1, V]: p_0..p_K
        p_draft = rows.weights[:, :K].gather(2, drafts[:, :, None])[:, :, 0] / rows.total[:, :K]  # p_i(d_{i+1})
        uniform = torch.rand(B, K, generator=self.generator, device=self.device)
        if q is not None:
            q_draft = q.gather(2, drafts[:, :, None])[:, :, 0]
            accept = uniform * q_draft < p_draft  # u < p/q without dividing (q > 0: d was drawn from q)
        else:
            accept = uniform < p_draft  # point-mass proposal: accept with probability p(d)
        accepted = accept.long().cumprod(1).sum(1)  # [B] leading accepts, 0..K
        # Correction token: from normalize(max(p_a - q_a, 0)) after a rejection, from p_K (bonus) otherwise.
        p_a = rows.weights[self.slot_ids, accepted] / rows.total[self.slot_ids, accepted][:, None]
        rejected = accepted < K
        at = accepted.clamp(max=K - 1)  # the rejected draft's row (any row when all were accepted: unused)
        if q is not None:
            q_a = q[self.slot_ids, at]
        else:
            q_a = torch.zeros(B, V, device=self.device).scatter_(1, drafts[self.slot_ids, at][:, None], 1.0)
        correction = sample_categorical(_correction_distribution(p_a, q_a, rejected), self.generator)[:, 0]

        cols = torch.arange(K + 1, device=self.device)[None, :]
        # d_1..d_a, then the correction (or bonus) token in column a; later columns are never kept.
        emitted = torch.cat([drafts, correction[:, None]], 1).scatter_(1, accepted[:, None], correction[:, None])
        num_emit = accepted + 1
        # Truncate at the first EOS and at the token budget.
        is_eos = self._is_eos(emitted) & (cols < num_emit[:, None])
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, K + 1)
        budget = self.max_new_tokens - self.generated
        num_keep = torch.minimum(torch.minimum(num_emit, first_eos), budget)
        num_keep = torch.where(live, num_keep, 0)
        keep = cols < num_keep[:, None]
        self._record(torch.where(keep, self.lengths[:, None] - 1 + cols, self.scratch), rows)
        self.tokens[self.slot_ids[:, None].expand(B, K + 1), torch.where(keep, self.lengths[:, None] + cols, self.scratch)] = emitted
        hit_eos = is_eos.any(1) & (first_eos <= num_keep)
        finished = live & (hit_eos | (self.generated + num_keep >= self.max_new_tokens))
        self.lengths += num_keep
        self.generated += num_keep
        self._proposed += live.long().sum() * K
        self._accepted += torch.where(live, accepted, 0).sum()
        self.target.rollback(K, accepted, live)
        self.drafter.commit(accepted, live)
        self.live &= ~finished


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _normalize_prompts(prompts, tokenizer, vocab_size) -> List[List[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be None or a list of strings or of token-id lists")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt (or be None for BOS-only generation)")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(f"prompts[{i}] is a string: pass tokenizer= to encode string prompts")
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        elif isinstance(prompt, Sequence):
            ids = list(prompt)
        else:
            raise TypeError(f"prompts[{i}] must be a string or a list of token ids, got {type(prompt).__name__}")
        if len(ids) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
                raise ValueError(f"prompts[{i}] holds token {t!r}, outside the vocabulary [0, {vocab_size})")
        out.append([int(t) for t in ids])
    return out


def generate_replay(
    model,
    *,
    num_sequences: int,
    max_new_tokens: int,
    top_k: int = 64,
    batch_size: int = 64,
    temperature: float = 1.0,
    prompts=None,
    draft_model=None,
    num_draft_tokens: int = 4,
    seed: int = 0,
    out_dir: Optional[str] = None,
    progress: bool = True,
    shard_size: int = 1024,
    tokenizer=None,
    sampled_draws: Optional[int] = None,
    drafter: Union[Drafter, str, None] = None,
    logprob_dtype=torch.float32,
    bos_token_id: Optional[int] = None,
    eos_token_id=None,
    pad_token_id: Optional[int] = None,
    on_shard_written: Optional[Callable[[int, str], None]] = None,
    check_every: Optional[int] = None,
    keep_in_memory: bool = True,
    backend: str = "native",
    vllm_engine_args: Optional[dict] = None,
) -> Optional[ReplayBuffer]:
    """Sample ``num_sequences`` sequences from ``model`` and record its teacher at every sampled position.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM``), already on its device. It is run in
            eval mode under ``torch.inference_mode`` (its training flag is restored afterwards).
        num_sequences: how many sequences to generate.
        max_new_tokens: generated tokens per sequence at most (a sequence also ends at EOS).
        top_k: teacher slots recorded per position (``k <= vocab size``).
        batch_size: decode slots; finished sequences are replaced at once (continuous batching).
        temperature: sample from (and record) ``softmax(logits / temperature)``; must be > 0.
        prompts: None (every sequence is BOS alone), or a list of strings (needs ``tokenizer``) or of
            token-id lists; sequence ``i`` uses ``prompts[i % len(prompts)]``.
        draft_model: a smaller causal LM with the same vocabulary, for speculative decoding.
        num_draft_tokens: draft tokens per speculative step.
        seed: base seed; shard ``s`` samples with a generator seeded from ``(seed, s)``.
        out_dir: directory to write the sharded buffer to; a rerun resumes after the last complete shard.
        progress: show a tqdm bar (sequences, tokens/s, acceptance rate).
        shard_size: sequences per shard (the unit of resumption).
        tokenizer: optional; used for string prompts and for BOS/EOS ids when the config lacks them.
        sampled_draws: record a "sampled" teacher instead of top-k: N draws with replacement from the
            distribution, stored as unique ids and log frequencies (the ``min(top_k, N)`` most frequent).
        drafter: a :class:`Drafter` (e.g. ``NGramDrafter()``) or ``"ngram"``, for speculative decoding
            without a second model. Mutually exclusive with ``draft_model``.
        logprob_dtype: torch.float32 (default) or torch.float16 for the stored log-probs.
        bos_token_id / eos_token_id / pad_token_id: override the ids found in the config/tokenizer;
            ``eos_token_id`` may be a list. Padding defaults to EOS (or 0).
        on_shard_written: called as ``fn(shard_index, out_dir)`` after each shard is durably written.
        check_every: decode steps between host checks for finished sequences (default 1 on the CPU,
            4 on accelerators, where each check is a device sync).
        keep_in_memory: return the whole buffer (default). With ``out_dir``, False keeps only the shard
            being generated in memory and returns None (for runs larger than RAM; load shards later,
            the counters of the run are in ``metadata.json`` under ``generation_stats``).
        backend: ``"native"`` (this module's decode loop) or ``"vllm"``: ``model`` is then a local model
            directory or a ``vllm.LLM``, and the buffer means the same (selfreplay_fast/vllm_backend.py;
            draft_model, drafter, sampled_draws and check_every are native only).
        vllm_engine_args: with ``backend="vllm"`` and a model directory, extra ``vllm.LLM`` arguments.

    Returns:
        The :class:`ReplayBuffer` of all ``num_sequences`` sequences (``buffer.generation_stats`` holds
        the counters of this call, including the speculative acceptance rate), or None when
        ``keep_in_memory=False``.
    """
    if backend != "native" or vllm_engine_args is not None:  # the vLLM backend refuses what it cannot honor
        arguments = dict(locals())  # every argument, by name (before the import adds a name)
        from .vllm_backend import generate_with_backend

        return generate_with_backend(arguments)
    # ---- argument checks ----
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model must be a Hugging Face causal LM (torch.nn.Module with .config), got {type(model).__name__}")
    num_sequences = _check_positive_int("num_sequences", num_sequences)
    max_new_tokens = _check_positive_int("max_new_tokens", max_new_tokens)
    top_k = _check_positive_int("top_k", top_k)
    batch_size = _check_positive_int("batch_size", batch_size)
    shard_size = _check_positive_int("shard_size", shard_size)
    num_draft_tokens = _check_positive_int("num_draft_tokens", num_draft_tokens)
    temperature = check_temperature(temperature)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    if sampled_draws is not None:
        sampled_draws = _check_positive_int("sampled_draws", sampled_draws)
    if isinstance(logprob_dtype, str):
        if logprob_dtype not in LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {list(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
        logprob_dtype = LOGPROB_DTYPES[logprob_dtype]
    if logprob_dtype not in LOGPROB_DTYPES.values():
        raise ValueError(f"logprob_dtype must be torch.float32 or torch.float16, got {logprob_dtype!r}")
    if check_every is not None:
        check_every = _check_positive_int("check_every", check_every)
    if not keep_in_memory and out_dir is None:
        raise ValueError("keep_in_memory=False needs out_dir: without it the generated buffer would be lost")

    vocab_size = _vocab_size(model)
    if top_k > vocab_size:
        raise ValueError(f"top_k = {top_k} exceeds the model's vocabulary size {vocab_size}")
    k = top_k if sampled_draws is None else min(top_k, sampled_draws)

    if draft_model is not None and drafter is not None:
        raise ValueError("pass either draft_model or drafter, not both")
    if draft_model is not None:
        if not isinstance(draft_model, torch.nn.Module) or not hasattr(draft_model, "config"):
            raise TypeError(f"draft_model must be a Hugging Face causal LM, got {type(draft_model).__name__}")
        draft_vocab = _vocab_size(draft_model)
        if draft_vocab != vocab_size:
            raise ValueError(
                f"draft_model has a vocabulary of {draft_vocab} tokens but model has {vocab_size}: "
                "speculative decoding needs a draft model that shares the target's vocabulary"
            )
        if _model_device_dtype(draft_model)[0] != _model_device_dtype(model)[0]:
            raise ValueError("draft_model must be on the same device as model")
        drafter = ModelDrafter(draft_model)
    elif isinstance(drafter, str):
        if drafter != "ngram":
            raise ValueError(f"drafter must be a Drafter instance, 'ngram' or None, got {drafter!r}")
        drafter = NGramDrafter()
    elif drafter is not None and not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must be a Drafter instance, 'ngram' or None, got {type(drafter).__name__}")

    config = model.config
    generation_config = getattr(model, "generation_config", None)
    eos_ids = _token_id_list(eos_token_id)
    if eos_token_id is None:
        eos_ids = (_token_id_list(getattr(generation_config, "eos_token_id", None))
                   or _token_id_list(getattr(config, "eos_token_id", None))
                   or _token_id_list(getattr(tokenizer, "eos_token_id", None)))
    for t in eos_ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"eos_token_id {t} is outside the vocabulary [0, {vocab_size}); pass eos_token_id= explicitly")
    if prompts is None:
        bos = bos_token_id if bos_token_id is not None else _first_id(
            getattr(tokenizer, "bos_token_id", None), getattr(config, "bos_token_id", None),
            getattr(generation_config, "bos_token_id", None))
        if bos is None:
            raise ValueError(
                "the model has no BOS token (config, generation_config and tokenizer define none) and prompts is None: "
                "pass prompts= (strings or token-id lists) or bos_token_id="
            )
        if isinstance(bos, bool) or not isinstance(bos, numbers.Integral) or not 0 <= bos < vocab_size:
            raise ValueError(f"bos_token_id {bos!r} is outside the vocabulary [0, {vocab_size})")
        prompt_list = [[int(bos)]]
        prompts_digest = hashlib.sha256(f"bos:{int(bos)}".encode()).hexdigest()
    else:
        prompt_list = _normalize_prompts(prompts, tokenizer, vocab_size)
        prompts_digest = hashlib.sha256(json.dumps(prompt_list).encode()).hexdigest()
    if pad_token_id is None:
        pad_token_id = eos_ids[0] if eos_ids else 0
    max_len = max(len(p) for p in prompt_list) + max_new_tokens
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and max_len > max_positions:
        raise ValueError(
            f"the longest prompt plus max_new_tokens is {max_len} tokens, beyond the model's "
            f"max_position_embeddings = {max_positions}"
        )

    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types and isinstance(window, int) and max_len > window:
        raise NotImplementedError(
            f"the model uses sliding-window attention (window {window}) and sequences can reach {max_len} tokens; "
            "generate_replay's slot cache supports full attention only (keep prompt + max_new_tokens <= the window)"
        )

    device, _ = _model_device_dtype(model)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else 4
    num_shards = -(-num_sequences // shard_size)

    settings = {
        "model_name": _model_name(model),
        "config_hash": model_config_hash(model),
        "vocab_size": vocab_size,
        "k": k,
        "mode": "tail" if sampled_draws is None else "sampled",
        "sampled_draws": sampled_draws,
        "temperature": temperature,
        "seed": seed,
        "num_sequences": num_sequences,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "prompts_sha256": prompts_digest,
        "num_prompts": len(prompt_list),
        "eos_token_ids": eos_ids,
        "pad_token_id": int(pad_token_id),
        "drafter": drafter.describe() if drafter is not None else None,
        "num_draft_tokens": num_draft_tokens if drafter is not None else None,
        "logprob_dtype": str(logprob_dtype).replace("torch.", ""),
    }

    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "k": k,
        "mode": settings["mode"],
        "pad_token_id": int(pad_token_id),
        "logprob_dtype": settings["logprob_dtype"],
        "model_name": settings["model_name"],
        "config_hash": settings["config_hash"],
        "temperature": temperature,
        "seed": seed,
        "generation": settings,
    }

    # ---- resume ----
    writer: Optional[ShardedBufferWriter] = None
    parts: List[ReplayBuffer] = []  # the shards of the returned buffer (with keep_in_memory)
    if out_dir is not None:
        if not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a path or None, got {type(out_dir).__name__}")
        writer = ShardedBufferWriter(out_dir, "generation", settings, metadata, shard_size, num_shards,
                                     producer="generate_replay", keep_done=keep_in_memory)
        out_dir = writer.out_dir
        for t in writer.done_tensors:
            parts.append(ReplayBuffer(t["input_ids"], t["lengths"], t["teacher_ids"], t["teacher_logprobs"],
                                      t["teacher_tail_logprob"], vocab_size=vocab_size, mode=settings["mode"],
                                      pad_token_id=pad_token_id))
        writer.done_tensors = []  # held by parts now
        if not writer.entries:
            writer.write_progress()  # claim the directory before the first shard

    # ---- generation ----
    recorder = _Recorder(k, sampled_draws)
    total_stats = GenerationStats()
    start_shard = writer.num_done_shards if writer is not None else 0
    done_sequences = writer.num_done_sequences if writer is not None else 0

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_sequences, initial=done_sequences, unit="seq", desc="generate_replay", dynamic_ncols=True)
    run_start = time.perf_counter()
    run_tokens = [0]
    last_postfix = [0.0]

    def progress_update(num_finished, num_tokens, engine):
        run_tokens[0] += num_tokens
        if bar is None:
            return
        bar.update(num_finished)
        now = time.perf_counter()
        if now - last_postfix[0] > 0.5:
            last_postfix[0] = now
            postfix = {"tok/s": f"{run_tokens[0] / max(now - run_start, 1e-9):.0f}"}
            if engine.drafter is not None and engine.stats.target_forwards:
                proposed = int(engine._proposed)
                if proposed:
                    postfix["accept"] = f"{int(engine._accepted) / proposed:.2f}"
            bar.set_postfix(postfix, refresh=False)

    was_training = model.training
    draft_was_training = draft_model.training if draft_model is not None else False
    model.eval()
    if draft_model is not None:
        draft_model.eval()
    try:
        with torch.inference_mode():
            if start_shard < num_shards:
                check_slot_attention(model)
                if draft_model is not None:
                    check_slot_attention(draft_model, name="draft_model")
            for shard in range(start_shard, num_shards):
                first = shard * shard_size
                count = min(shard_size, num_sequences - first)
                shard_prompts = [prompt_list[(first + i) % len(prompt_list)] for i in range(count)]
                generator = torch.Generator(device=device).manual_seed(_shard_seed(seed, shard))
                engine = _ShardEngine(
                    model=model, prompts=shard_prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    temperature=temperature, recorder=recorder, eos_ids=eos_ids, vocab_size=vocab_size,
                    drafter=drafter, num_draft_tokens=num_draft_tokens, generator=generator,
                    check_every=check_every, progress_update=progress_update,
                )
                results = engine.run()
                part = _assemble(results, vocab_size, k, settings["mode"], pad_token_id, logprob_dtype)
                total_stats.add(engine.stats)
                if keep_in_memory:
                    parts.append(part)
                if writer is not None:
                    writer.write_shard(part._tensors(), entry_extra={"stats": engine.stats.as_dict()},
                                       extra_metadata={"generation_stats": total_stats.as_dict()})
                    if on_shard_written is not None:
                        on_shard_written(shard, out_dir)
                elif on_shard_written is not None:
                    on_shard_written(shard, None)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
        if draft_model is not None:
            draft_model.train(draft_was_training)
    if not keep_in_memory:
        return None
    meta = dict(metadata)
    meta.update(num_sequences=num_sequences, complete=True, generation_stats=total_stats.as_dict())
    buffer = ReplayBuffer.concat(parts, metadata=meta)
    buffer.generation_stats = total_stats
    return buffer


def _assemble(results, vocab_size, k, mode, pad_token_id, logprob_dtype) -> ReplayBuffer:
    """Pad one shard's per-sequence results into a ReplayBuffer."""
    lengths = torch.tensor([r[0].numel() for r in results], dtype=torch.long)
    width = int(lengths.max())
    S = len(results)
    input_ids = torch.full((S, width), pad_token_id, dtype=torch.long)
    teacher_ids = torch.full((S, width, k), -1, dtype=torch.int32)
    teacher_lp = torch.zeros(S, width, k, dtype=torch.float32)
    tail = torch.full((S, width), float("-inf"), dtype=torch.float32)
    for i, (tok, ids, lp, tl) in enumerate(results):
        n = tok.numel()
        input_ids[i, :n] = tok
        teacher_ids[i, :n] = ids
        teacher_lp[i, :n] = lp
        tail[i, :n] = tl
    return ReplayBuffer(input_ids, lengths, teacher_ids, teacher_lp.to(logprob_dtype), tail.to(logprob_dtype),
                        vocab_size=vocab_size, mode=mode, pad_token_id=pad_token_id)
