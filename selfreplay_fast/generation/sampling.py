"""Sampling from ``softmax(logits / temperature)`` and recording the teacher of each sampled position:
the inverse-CDF sampler, the rows of the distribution computed in few passes, the top-k (or sampled)
teacher rows, and the residual distribution that makes speculative sampling exact."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["sample_categorical", "SamplingRows", "TeacherRecorder", "correction_distribution", "SamplerScratch"]


_SAMPLE_BLOCK = 256
_ONE_LEVEL_MAX = 4 * _SAMPLE_BLOCK  # vocabularies sampled from one float64 cumsum


class SamplerScratch:
    """Reusable float64 storage for the sampler's CDF, held by a decode loop across its steps.

    On the CPU a fresh [B, V] float64 tensor per decode step is freshly mapped memory more often than not
    (glibc returns large freed blocks to the system), and its page faults cost more than the cumsum
    itself: measured 3.2 ms of a 28.6 ms step at B = 512, V = 258, against 0.07 ms into a held buffer.
    """

    def __init__(self):
        self._flat: Optional[torch.Tensor] = None

    def take(self, shape, device) -> torch.Tensor:
        """A float64 tensor of ``shape`` (contents undefined), a view of storage kept for later calls."""
        numel = 1
        for size in shape:
            numel *= size
        flat = self._flat
        if flat is None or flat.numel() < numel or flat.device != torch.device(device):
            flat = self._flat = torch.empty(numel, dtype=torch.float64, device=device)
        return flat[:numel].view(shape)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator, num_samples: int = 1,
                       scratch: Optional[SamplerScratch] = None) -> torch.Tensor:
    """Draw ``num_samples`` ids (with replacement) per row of ``probs`` [..., V] by inverse CDF.

    Rows need not be normalized. ``torch.multinomial`` costs ~8x more on the CPU. A vocabulary of at
    most ``_ONE_LEVEL_MAX`` ids takes one float64 cumsum (few ops per decode step). A larger one would
    accumulate rounding in a float32 cumsum and spend time writing a float64 one, so it is two-level:
    pick a block of 256 ids from the block totals (accumulated in float64), then the id inside the
    chosen block from its float32 cumsum. Zero-probability ids are never drawn: a draw lands on id
    ``i`` iff ``cdf[i-1] <= u < cdf[i]``, with ``u`` kept below the total. ``scratch``: where the
    one-level CDF is written (the same draws; no allocation per call).
    """
    vocab = probs.shape[-1]
    if vocab <= _ONE_LEVEL_MAX:
        return _sample_one_level(probs, generator, num_samples, scratch)
    return _sample_two_level(probs, generator, num_samples)


def _sample_one_level(probs, generator, num_samples, scratch=None):
    lead, vocab = probs.shape[:-1], probs.shape[-1]
    rows = probs.reshape(-1, vocab)
    if scratch is None:
        cdf = rows.cumsum(-1, dtype=torch.float64)  # [R, V]
    else:  # converted into the scratch, then summed in place (cumsum's dtype= would allocate a float64 copy)
        cdf = scratch.take(rows.shape, rows.device).copy_(rows)
        torch.cumsum(cdf, -1, out=cdf)
    total = cdf[:, -1:]
    u = torch.rand(cdf.shape[0], num_samples, generator=generator, dtype=torch.float64, device=cdf.device)
    # u * total can round up to total itself, which would land past the last positive id.
    u = torch.minimum(u.mul_(total), total.nextafter(torch.zeros((), dtype=torch.float64, device=cdf.device)))
    return torch.searchsorted(cdf, u, right=True).reshape(*lead, num_samples)


def _sample_two_level(probs, generator, num_samples):
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
    # A u that rounding puts past the block's cumsum goes to the block's last id with positive mass.
    last_positive = (block_cdf < block_cdf[:, :, -1:]).sum(-1)
    ids = block * _SAMPLE_BLOCK + torch.minimum(offset, last_positive)
    return ids.reshape(*lead, num_samples)


class SamplingRows:
    """Rows of the sampling distribution ``softmax(logits / temperature)``, computed in few passes.

    ``weights = exp(z - max z)`` are the unnormalized probabilities (the sampler takes them as they
    are), ``total`` their sum, so ``p = weights / total`` and ``lse = max + log(total)``. The top-k
    come from one ``topk`` over the logits (whose first value is the max, for free). ``total``,
    ``log_total`` and ``lse`` keep a trailing dimension of 1 ([..., 1]): they broadcast against rows
    without a reshape per step.
    """

    def __init__(self, logits: torch.Tensor, temperature: float, k: int):
        # `logits` is a fresh model output that nothing else reads, so it is overwritten in place:
        # a new [B, V] tensor per step would cost an allocation (and page faults on the CPU) per pass.
        z = logits if logits.dtype == torch.float32 else logits.float()
        if temperature != 1.0:
            z = z.div_(temperature)
        self.top_z, self.top_ids = z.topk(k, dim=-1)
        shift = self.top_z[..., :1]
        self.weights = z.sub_(shift).exp_()
        self.total = self.weights.sum(-1, keepdim=True)
        self.log_total = self.total.log()
        self.lse = shift + self.log_total


class TeacherRecorder:
    """Turns rows of the sampling distribution into teacher rows (top-k + tail, or sampled)."""

    def __init__(self, k: int, sampled_draws: Optional[int]):
        self.k = k
        self.sampled_draws = sampled_draws
        # top-k mode needs the k largest logits; sampled mode only the max (to shift the exponentials).
        self.top = k if sampled_draws is None else 1

    def __call__(self, rows: SamplingRows, generator):
        """-> ids [..., k] int32, logprobs [..., k] float32, tail [..., 1]. Consumes ``rows.weights``
        (overwritten in place), so call it after all sampling from ``rows``."""
        if self.sampled_draws is None:
            logprobs = rows.top_z - rows.lse
            # Tail mass = sum of the non-top-k probabilities, summed directly (no 1 - sum p cancellation):
            # this is logsumexp over the non-top-k logits minus the full LSE, shifted by the row max. It
            # is exact to float32 rounding down to a tail of ~1e-37 of the top probability, and -inf below
            # (and when k = V), where the tail's contribution to any KL is < 1e-35.
            rest = rows.weights.scatter_(-1, rows.top_ids, 0.0).sum(-1, keepdim=True)
            tail = rest.log() - rows.log_total
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
        return ids.int().reshape(*lead, self.k), logprobs.reshape(*lead, self.k), tail.reshape(*lead, 1)


def correction_distribution(p: torch.Tensor, q: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Distribution of the token emitted after the accepted drafts (rows [B, V], need not be normalized).

    After a rejection it is ``normalize(max(p - q, 0))``, the residual that makes speculative sampling
    exact; when every draft was accepted it is the bonus distribution ``p`` itself.
    """
    residual = (p - q * rejected[:, None]).clamp_min(0)
    # The residual mass is 0 only if p == q exactly, where a rejection has probability 0: fall back to p.
    return torch.where(residual.sum(1, keepdim=True) > 0, residual, p)
