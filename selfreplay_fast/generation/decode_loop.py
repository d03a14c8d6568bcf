"""The decode loop of one shard: continuous batching over the slot cache, plain or speculative steps,
teacher rows recorded at every sampled position; and its counters (``GenerationStats``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from .drafting import DecodeState
from ..model_info import model_device_dtype
from .sampling import SamplerScratch, SamplingRows, correction_distribution, sample_categorical
from .slot_cache import SlotModelPool

__all__ = ["GenerationStats", "ShardEngine"]


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


class ShardEngine:
    def __init__(self, *, model, prompts, max_new_tokens, batch_size, temperature, recorder, eos_ids, vocab_size,
                 drafter, num_draft_tokens, generator, check_every, progress_update,
                 slot_models: Optional[SlotModelPool] = None):
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
        self.device, _ = model_device_dtype(model)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=self.device) if eos_ids else None
        self.max_len = max(len(p) for p in prompts) + max_new_tokens
        self.stats = GenerationStats()
        self.scratch_cdf = SamplerScratch()
        self.slot_models = slot_models if slot_models is not None else SlotModelPool()

    def _is_eos(self, tokens):
        if self.eos is None:
            return torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        return torch.isin(tokens, self.eos)

    def run(self):
        B, L, k, dev = self.batch_size, self.max_len, self.recorder.k, self.device
        # Column `position` of `tokens` and row `position + 1` of the teacher records (row 0 is never
        # written) belong to a sequence's token and to the distribution that follows it, so one index,
        # the token's position, writes both; index L + 1 is the write scratch of slots that must not
        # write (dead slots, past the end).
        scratch = L + 1
        self.tokens = torch.zeros(B, L + 2, dtype=torch.long, device=dev)
        self.t_ids = torch.full((B, L + 2, k), -1, dtype=torch.int32, device=dev)
        # Per row: k teacher log-probs, the tail, the log-prob of the emitted token (one write per step).
        self.record_init = torch.cat([torch.zeros(k), torch.tensor([float("-inf"), 0.0])]).to(dev)
        self.t_float = self.record_init.repeat(B, L + 2, 1)
        self.lengths = torch.ones(B, dtype=torch.long, device=dev)
        self.limit = torch.ones(B, dtype=torch.long, device=dev)  # prompt length + max_new_tokens
        self.live = torch.zeros(B, dtype=torch.bool, device=dev)
        self.holds = torch.zeros(B, dtype=torch.bool, device=dev)  # slot holds a not yet harvested sequence
        self.last_token = torch.zeros(B, 1, dtype=torch.long, device=dev)  # the plain step's pending token
        self.slot_seq = [-1] * B  # which sequence each slot holds (host side), -1 = none
        self.results = [None] * len(self.prompts)
        self.next_seq = 0
        self.slot_ids = torch.arange(B, device=dev)  # for indexing one entry per slot
        self.scratch = scratch
        extra = self.num_draft_tokens if self.drafter is not None else 0
        self.slot_columns = self.slot_ids[:, None].expand(B, extra + 1)
        self.target = self.slot_models.get(self.model, B, L + 1)
        if self.drafter is not None:
            self.drafter.start(B, L, self.vocab_size)
        self.state = DecodeState(self.tokens, self.lengths, self.live, self.generator, self.temperature, L)
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
                done_list = (self.holds ^ self.live).tolist()  # held and no longer live; the host sync
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
        dev = self.device
        slots = torch.zeros(self.batch_size, dtype=torch.bool, device=dev)
        slot_index = torch.tensor([b for b, _ in refill], device=dev)
        slots[slot_index] = True
        prompts = [self.prompts[s] for _, s in refill]
        max_prompt = max(len(p) for p in prompts)
        rows = [p + [0] * (self.max_len + 2 - len(p)) for p in prompts]  # one host-to-device copy
        for b, s in refill:
            self.slot_seq[b] = s
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=dev)
        self.tokens[slot_index] = torch.tensor(rows, dtype=torch.long, device=dev)
        self.t_ids[slot_index] = -1
        self.t_float[slot_index] = self.record_init
        self.lengths[slot_index] = prompt_lengths
        self.limit[slot_index] = prompt_lengths + self.max_new_tokens
        self.last_token[slot_index, 0] = torch.tensor([p[-1] for p in prompts], device=dev)
        self.live[slot_index] = True
        self.holds[slot_index] = True
        refilled = [b for b, _ in refill]
        self.target.reset(slots, refilled)
        if self.drafter is not None:
            self.drafter.reset(slots, max_prompt)
        return max_prompt

    def _harvest_and_refill(self, done_list) -> int:
        finished = [b for b, d in enumerate(done_list) if d]
        index = torch.tensor(finished, device=self.device)
        self.holds[index] = False
        k = self.recorder.k
        lengths = self.lengths[index].tolist()
        tokens = self.tokens[index].cpu().unbind(0)
        ids = self.t_ids[index, 1:].cpu().unbind(0)
        rows = self.t_float[index, 1:].cpu()
        lp, tail, sampled = rows[..., :k].unbind(0), rows[..., k].unbind(0), rows[..., k + 1].unbind(0)
        new_tokens = 0
        for i, b in enumerate(finished):
            n = lengths[i]
            seq = self.slot_seq[b]
            # Views of this harvest's copies (assemble_shard copies them into the shard).
            self.results[seq] = (tokens[i][:n], ids[i][:n], lp[i][:n], tail[i][:n], sampled[i][:n])
            new_tokens += n - len(self.prompts[seq])
            self.slot_seq[b] = -1
        self.stats.sequences += len(finished)
        self.stats.generated_tokens += new_tokens
        if self.progress_update is not None:
            self.progress_update(len(finished), new_tokens, self)
        return self._refill(done_list)

    # -- one decode step --------------------------------------------------------------------------

    def _record(self, slot_index: torch.Tensor, at: torch.Tensor, rows: SamplingRows, emitted: torch.Tensor):
        """Write teacher rows and the log-prob of the token each row's distribution emitted (``emitted``
        [B, C], drawn from ``rows`` [B, C, V] or [B, V] with C = 1): at ``[slot_index, at]``, both
        [B] or [B, C] (the scratch for rows not to keep)."""
        # Before the recorder, which consumes rows.weights: log(w / total) of the emitted token, i.e. its
        # log-prob under softmax(logits / temperature) (an emitted token has w > 0, so this is finite).
        if rows.weights.dim() == emitted.dim():  # [B, V] rows, [B, 1] emitted
            sampled = rows.weights.gather(-1, emitted).log_() - rows.log_total
        else:
            sampled = rows.weights.gather(-1, emitted[..., None]).log_() - rows.log_total
        ids, values, tail = self.recorder(rows, self.generator)
        self.t_ids[slot_index, at] = ids
        self.t_float[slot_index, at] = torch.cat([values, tail, sampled], -1)

    def _plain_step(self, width: int):
        live, lengths = self.live, self.lengths
        if width == 1:  # every live slot has one pending token: the shortest path
            logits = self.target.step(self.last_token, lengths, live)
        else:
            logits = self.target.feed(self.tokens, lengths, live, width, keep=1)[:, -1]
        rows = SamplingRows(logits, self.temperature, self.recorder.top)
        token = sample_categorical(rows.weights, self.generator, scratch=self.scratch_cdf)  # [B, 1]
        at = torch.where(live, lengths, self.scratch)  # the new token's position = its record's row
        self._record(self.slot_ids, at, rows, token)
        flat = token.view(-1)
        self.tokens[self.slot_ids, at] = flat
        self.last_token = token
        lengths += live
        going_on = lengths < self.limit
        if self.eos is not None:
            going_on &= torch.isin(flat, self.eos, invert=True)
        live &= going_on

    def _speculative_step(self, width: int):
        K = self.num_draft_tokens
        B, V = self.batch_size, self.vocab_size
        live = self.live
        drafts, q = self.drafter.propose(self.state, K)  # [B, K], [B, K, V] or None
        logits = self.target.feed(self.tokens, self.lengths, live, width, extra=drafts, keep=K + 1)
        rows = SamplingRows(logits, self.temperature, self.recorder.top)  # [B, K+1, V]: p_0..p_K
        p_draft = rows.weights[:, :K].gather(2, drafts[:, :, None])[:, :, 0] / rows.total[:, :K, 0]  # p_i(d_{i+1})
        uniform = torch.rand(B, K, generator=self.generator, device=self.device)
        if q is not None:
            q_draft = q.gather(2, drafts[:, :, None])[:, :, 0]
            accept = uniform * q_draft < p_draft  # u < p/q without dividing (q > 0: d was drawn from q)
        else:
            accept = uniform < p_draft  # point-mass proposal: accept with probability p(d)
        accepted = accept.long().cumprod(1).sum(1)  # [B] leading accepts, 0..K
        # Correction token: from normalize(max(p_a - q_a, 0)) after a rejection, from p_K (bonus) otherwise.
        p_a = rows.weights[self.slot_ids, accepted] / rows.total[self.slot_ids, accepted]
        rejected = accepted < K
        at = accepted.clamp(max=K - 1)  # the rejected draft's row (any row when all were accepted: unused)
        if q is not None:
            q_a = q[self.slot_ids, at]
        else:
            q_a = torch.zeros(B, V, device=self.device).scatter_(1, drafts[self.slot_ids, at][:, None], 1.0)
        correction = sample_categorical(correction_distribution(p_a, q_a, rejected), self.generator,
                                        scratch=self.scratch_cdf)[:, 0]

        cols = torch.arange(K + 1, device=self.device)[None, :]
        # d_1..d_a, then the correction (or bonus) token in column a; later columns are never kept.
        emitted = torch.cat([drafts, correction[:, None]], 1).scatter_(1, accepted[:, None], correction[:, None])
        num_emit = accepted + 1
        # Truncate at the first EOS and at the token budget.
        is_eos = self._is_eos(emitted) & (cols < num_emit[:, None])
        first_eos = torch.where(is_eos.any(1), is_eos.long().argmax(1) + 1, K + 1)
        budget = self.limit - self.lengths
        num_keep = torch.minimum(torch.minimum(num_emit, first_eos), budget)
        num_keep = torch.where(live, num_keep, 0)
        keep = cols < num_keep[:, None]
        # Column j's emitted token was drawn from (or accepted under) the target's p_j: its log-prob is of p_j,
        # recorded at the token's position (row lengths + j), where the token itself goes.
        at = torch.where(keep, self.lengths[:, None] + cols, self.scratch)
        self._record(self.slot_columns, at, rows, emitted)
        self.tokens[self.slot_columns, at] = emitted
        hit_eos = is_eos.any(1) & (first_eos <= num_keep)
        finished = live & (hit_eos | (num_keep >= budget))
        self.lengths += num_keep
        self._proposed += live.long().sum() * K
        self._accepted += torch.where(live, accepted, 0).sum()
        self.target.rollback(K, accepted, live)
        self.drafter.commit(accepted, live)
        self.live &= ~finished
