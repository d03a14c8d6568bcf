"""Per-row scalars of the replay KL, shared by every fused implementation (docs/design.md, section 2).

Everything a mode needs from the vocabulary reduces to a few numbers per row: the log-sum-exp of the
student's scaled logits over the complement of the teacher's slots (as its maximum and the log-sum
relative to it) and the k scaled logits on the slots (``z_teacher``). From those and the teacher this module computes, on
[rows, k] tensors only, the loss of each row and the gradient w.r.t. the scaled logits z in the form

    dL/dz_v = alpha * exp(z_v - beta) - gamma * exp(z_v - delta)    for v outside the teacher's slots
    dL/dz_t = grad_teacher[t]                                         for t on a used slot

so one vocabulary kernel serves all modes: modes differ only in these per-row scalars. The code
evaluates the dense part as a single exponential

    alpha * exp(z_v - beta) - gamma * exp(z_v - delta) = sign * exp((z_v - origin) + log_coef)

with origin = the complement's largest scaled logit, and sign and log_coef = log|c (1 - Q)| - (the
complement's log-sum) taken in log space (docs/design.md, section 2). z_v - origin <= 0 and
log_coef <= 0 for v outside the slots,
so the exponent never overflows and no product of a huge scalar and an underflowed probability
(inf * 0 = NaN) is ever formed. The two are added only at the end, each rounded on its own scale: at
a small temperature z and LSE_c are ~1e8 (an fp32 ulp of 8), and any per-row scalar folded into the
origin (log 1/T, log|c|) would be rounded away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NEG_INF = float("-inf")


@dataclass
class RowTerms:
    """Outside the slots dL/dz_v = sign * exp((z_v - origin) + log_coef); on used slots grad_teacher."""

    loss: torch.Tensor  # [c] KL of each row (0 for a row without used slots)
    sign: torch.Tensor  # [c] sign of the dense gradient (+1, -1, or 0 for an exact 0)
    origin: torch.Tensor  # [c] max of the complement's z (-inf for an empty complement: the passes use 0 then)
    log_coef: torch.Tensor  # [c] log of the dense gradient's coefficient, relative to exp(z_v - origin)
    grad_teacher: torch.Tensor  # [c, k] dL/dz on the slots, 0 on unused slots

    def scaled(self, row_scale: torch.Tensor):
        """(sign, origin, log_coef, grad_teacher) of row_scale[n] * dL/dz (row weight and 1/temperature).
        A zero scale gives sign 0: an exact 0 gradient."""
        sign = torch.where(row_scale == 0, 0.0, self.sign * torch.sign(row_scale))
        log_coef = self.log_coef + row_scale.abs().log()
        return sign, self.origin, log_coef, self.grad_teacher * row_scale[:, None]


def _signed_log_difference(log_a: torch.Tensor, log_b: torch.Tensor):
    """(sign, log|a - b|) of a - b for a, b >= 0 given as logs (-inf for 0)."""
    big = torch.maximum(log_a, log_b)
    gap = (log_a - log_b).abs()
    both_zero = big == NEG_INF
    log_abs = big + torch.log(-torch.expm1(-torch.where(both_zero, 1.0, gap)))
    sign = torch.where(log_a > log_b, 1.0, torch.where(log_b > log_a, -1.0, 0.0))
    log_abs = torch.where(both_zero | (sign == 0), NEG_INF, log_abs)
    return sign.to(log_a.dtype), log_abs


def compute_row_terms(
    z_teacher: torch.Tensor,
    max_complement: Optional[torch.Tensor],
    logsum_complement: Optional[torch.Tensor],
    teacher_logprobs: torch.Tensor,
    valid: torch.Tensor,
    teacher_tail_logprob: Optional[torch.Tensor],
    mode: str,
    vocab_size: Optional[int] = None,
) -> RowTerms:
    """z_teacher: [c, k] scaled student logits on the slots, -inf on unused slots.
    max_complement, logsum_complement: [c] the log-sum-exp LSE_c of the scaled logits outside the
    slots as max + log-sum relative to it (both -inf for an empty complement; max NaN when it holds a
    NaN, +inf when it holds +inf); None in "topk" mode, which never looks outside the slots.
    teacher_logprobs: [c, k], 0 on unused slots. valid: [c, k] bool.
    vocab_size: the whole vocabulary's size (tail mode: which rows have a complement at all).

    Every log-probability is formed as (z - m) - log-sum, with m the row's largest scaled logit, as
    torch.log_softmax does: at a small temperature z is ~1e8 and a log-sum-exp held as one fp32 number
    would lose its log-sum (log 2 for a tie) to rounding.

    Non-finite logits propagate as through a plain log-softmax: a NaN or +inf logit anywhere in a row
    (topk: on its slots) makes the row's loss NaN and its dense gradient NaN; -inf is a token of
    probability 0."""
    zero = torch.zeros((), dtype=z_teacher.dtype, device=z_teacher.device)
    has_valid = valid.any(dim=-1)

    if mode == "topk":
        # KL(p_hat || q_hat) over the slots only: q_hat = softmax of the k logits.
        filler = torch.where(has_valid, NEG_INF, 0.0)[:, None]
        log_p_hat = teacher_logprobs - torch.where(valid, teacher_logprobs, filler).logsumexp(-1, keepdim=True)
        log_q_hat = torch.log_softmax(torch.where(has_valid[:, None], z_teacher, 0.0), dim=-1)
        p_hat = torch.where(valid, log_p_hat.exp(), 0.0)
        loss = torch.where(valid, p_hat * (log_p_hat - log_q_hat), 0.0).sum(-1)
        grad_teacher = torch.where(valid, log_q_hat.exp() - p_hat, 0.0)
        return RowTerms(loss, zero.expand(loss.shape), zero.expand(loss.shape), (zero + NEG_INF).expand(loss.shape),
                        grad_teacher)

    row_max = torch.maximum(max_complement, z_teacher.amax(dim=-1))
    row_max = torch.where(row_max == NEG_INF, 0.0, row_max)
    z_rel = z_teacher - row_max[:, None]
    lse_teacher = z_rel.logsumexp(dim=-1)  # log-sum-exps relative to row_max: -inf for no used slot
    lse_complement = (max_complement - row_max) + logsum_complement
    lse = torch.logaddexp(lse_complement, lse_teacher)  # full vocabulary, in [0, log V] when finite
    # log_softmax of a row holding +inf is NaN (inf - inf); logaddexp alone could say +inf, and
    # log q = z - inf = -inf would turn it into an infinite loss or a zero gradient instead.
    lse = torch.where(lse == float("inf"), float("nan"), lse)
    log_q_teacher = z_rel - lse[:, None]
    log_one_minus_q = lse_complement - lse  # log(1 - Q), a log-sum-exp over the complement: never 1 - Q
    log_q_mass = lse_teacher - lse  # log Q
    p = torch.where(valid, teacher_logprobs.exp(), 0.0)
    mass = p.sum(-1)
    loss = torch.where(valid, p * (teacher_logprobs - log_q_teacher), 0.0).sum(-1)

    if mode == "tail":
        if teacher_tail_logprob is not None:
            log_r = teacher_tail_logprob
            r = log_r.exp()
        else:
            r = (1 - mass).clamp(0, 1)
            log_r = r.log()
        # The tail bucket exists when the teacher leaves mass there and the vocabulary has tokens there
        # (a complement whose logits are all -inf is a student tail of mass 0: an infinite KL, as in the
        # reference; a NaN complement gives NaN).
        active = (r > 0) & (valid.sum(-1) < vocab_size)
        r = torch.where(active, r, 0.0)
        tail = r * (torch.where(active, log_r, 0.0) - torch.where(active, log_one_minus_q, 0.0))
        loss = loss + tail
        # Outside the slots dL/dz_v = (mass - r Q / (1 - Q)) q_v = (mass (1 - Q) - r Q) exp(z_v - LSE_c):
        # the log of the subtracted part r Q.
        log_subtracted = torch.where(active, r.log() + log_q_mass, NEG_INF)
    else:  # "sampled": the same family with no tail bucket
        r = zero.expand(mass.shape)
        log_subtracted = torch.full_like(mass, NEG_INF)

    # dL/dz_v = (mass + r) q_v - r [v outside] q_v / (1 - Q) - p_v  (docs/design.md, eq. G)
    grad_teacher = torch.where(valid, (mass + r)[:, None] * log_q_teacher.exp() - p, 0.0)
    sign, log_abs = _signed_log_difference(mass.log() + log_one_minus_q, log_subtracted)
    sign = torch.where(torch.isnan(lse), float("nan"), sign)  # a NaN row's dense gradient is NaN, never 0
    # exp(z_v - LSE_c) = exp((z_v - max_complement) - logsum_complement); no dense part without a complement.
    log_coef = torch.where(max_complement == NEG_INF, NEG_INF, log_abs - logsum_complement)
    return RowTerms(loss, sign, max_complement, log_coef, grad_teacher)
