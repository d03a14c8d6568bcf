"""The plain, full-logits replay KL: the definition every fast implementation is tested against.

It materializes the [N, V] student log-softmax and lets autograd differentiate it, so it is simple,
float64-capable and independent of the chunked math in ``replay_kl.py`` (it shares only argument
checking). Use it for testing, never for training at scale. The math is in docs/design.md.
"""

from __future__ import annotations

import dataclasses

import torch

from ._inputs import check_chunk_size, prepare_replay_kl_inputs, prepare_sharded_inputs, IMPLS, _check_choice


class _GatherShards(torch.autograd.Function):
    """The full [V, ...] tensor from every rank's vocabulary shard [V_r, ...] (uneven shards are
    padded to the largest for the all_gather). Backward keeps this rank's rows of the gradient, with
    no sum over ranks: every rank computes the same replicated loss, hence the same full gradient."""

    @staticmethod
    def forward(ctx, shard, layout):
        import torch.distributed as dist

        ctx.rows = slice(layout.offset, layout.offset + layout.size)
        pad = max(layout.sizes)
        padded = shard.new_zeros((pad,) + tuple(shard.shape[1:]))
        padded[: shard.shape[0]] = shard
        gathered = [torch.empty_like(padded) for _ in layout.sizes]
        dist.all_gather(gathered, padded.contiguous(), group=layout.group)
        return torch.cat([g[:size] for g, size in zip(gathered, layout.sizes)])

    @staticmethod
    def backward(ctx, grad_full):
        return grad_full[ctx.rows], None


def reference_replay_kl(
    hidden,
    weight,
    teacher_ids,
    teacher_logprobs,
    *,
    bias=None,
    mask=None,
    mode="tail",
    temperature=1.0,
    reduction="mean",
    impl="auto",
    chunk_size=None,
    process_group=None,
    teacher_tail_logprob=None,
):
    """Same signature and result as :func:`selfreplay_fast.fused_replay_kl`; ``impl`` and
    ``chunk_size`` are accepted for drop-in use and ignored. With a ``process_group`` (vocab-parallel,
    the same contract as ``fused_replay_kl``) it all-gathers the weight and bias shards (O(V D) memory
    and traffic: a reference, not a training path) and computes the plain loss on every rank;
    backward gives each rank the full hidden gradient and its shard's weight/bias gradient."""
    _check_choice("impl", impl, IMPLS)
    check_chunk_size(chunk_size)
    kwargs = dict(bias=bias, mask=mask, teacher_tail_logprob=teacher_tail_logprob, mode=mode,
                  temperature=temperature, reduction=reduction)
    if process_group is None:
        inp = prepare_replay_kl_inputs(hidden, weight, teacher_ids, teacher_logprobs, **kwargs)
    else:
        inp, layout = prepare_sharded_inputs(process_group, hidden, weight, teacher_ids, teacher_logprobs, **kwargs)
        full_bias = _GatherShards.apply(inp.bias, layout) if inp.bias is not None else None
        inp = dataclasses.replace(inp, weight=_GatherShards.apply(inp.weight, layout), bias=full_bias)
    dtype = inp.row_dtype
    hidden = inp.hidden.to(dtype)
    if inp.mask is not None:
        # A position that does not count contributes exactly nothing, whatever its hidden state holds
        # (inf * 0 = NaN would otherwise reach the weight gradient).
        hidden = torch.where(inp.mask[:, None], hidden, 0.0)
    logits = hidden @ inp.weight.to(dtype).T
    if inp.bias is not None:
        logits = logits + inp.bias.to(dtype)
    scaled = logits / inp.temperature

    ids, lp = inp.teacher_ids, inp.teacher_logprobs
    valid = ids >= 0
    has_valid = valid.any(dim=-1)
    safe_ids = ids.clamp_min(0)

    if mode == "topk":
        # Both distributions renormalized over the teacher's slots: q_hat is the softmax of the k slot
        # logits, so no other logit (finite or not) enters. Rows without a valid slot get finite
        # filler (not -inf) so that autograd through the discarded branch stays NaN-free.
        filler = torch.where(has_valid, float("-inf"), 0.0)[:, None]
        z_t = scaled.gather(1, safe_ids)  # [N, k]
        lp_hat = lp - torch.where(valid, lp, filler).logsumexp(dim=-1, keepdim=True)
        log_q_hat = z_t - torch.where(valid, z_t, filler).logsumexp(dim=-1, keepdim=True)
        per_row = torch.where(valid, lp_hat.exp() * (lp_hat - log_q_hat), 0.0).sum(dim=-1)
    else:
        log_q = torch.log_softmax(scaled, dim=-1)  # [N, V]
        log_q_t = log_q.gather(1, safe_ids)  # [N, k]
        p = torch.where(valid, lp.exp(), 0.0)
        per_row = torch.where(valid, p * (lp - log_q_t), 0.0).sum(dim=-1)
        if mode == "tail":
            in_teacher = torch.zeros(log_q.shape, dtype=torch.int32, device=log_q.device)
            in_teacher = in_teacher.scatter_add(1, safe_ids, valid.int()) > 0  # [N, V]
            has_complement = ~in_teacher.all(dim=-1)
            exclude = in_teacher & has_complement[:, None]
            log_one_minus_q = log_q.masked_fill(exclude, float("-inf")).logsumexp(dim=-1)
            if inp.teacher_tail_logprob is not None:
                log_r = inp.teacher_tail_logprob
                r = log_r.exp()
            else:
                r = (1 - p.sum(dim=-1)).clamp(0, 1)
                log_r = r.log()
            active = (r > 0) & has_complement
            tail = r * (torch.where(active, log_r, 0.0) - torch.where(active, log_one_minus_q, 0.0))
            per_row = per_row + torch.where(active, tail, 0.0)

    if inp.mask is not None:
        per_row = torch.where(inp.mask, per_row, 0.0)
    if reduction == "none":
        return per_row.reshape(inp.lead_shape)
    total = per_row.sum()
    if reduction == "sum":
        return total
    count = inp.mask.sum() if inp.mask is not None else torch.tensor(per_row.shape[0], device=per_row.device)
    return total / count.clamp_min(1).to(total.dtype)
