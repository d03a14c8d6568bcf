"""Per-row scalars of the replay KL, shared by every fused implementation (docs/design.md, section 2).

Everything a mode needs from the vocabulary reduces to two numbers per row: the log-sum-exp of the
student's scaled logits over the complement of the teacher's slots (``lse_complement``) and the k
scaled logits on the slots (``z_teacher``). From those and the teacher this module computes, on
[rows, k] tensors only, the loss of each row and the gradient w.r.t. the scaled logits z in the form

    dL/dz_v = alpha * exp(z_v - beta) - gamma * exp(z_v - delta)    for v outside the teacher's slots
    dL/dz_t = grad_teacher[t]                                         for t on a used slot

so one vocabulary kernel serves all modes: modes differ only in these per-row scalars. The two
exponentials are each bounded by 1 (beta >= z_v and delta >= z_v), so no product of a huge scalar and
an underflowed probability can produce inf or NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NEG_INF = float("-inf")


@dataclass
class RowTerms:
    loss: torch.Tensor  # [c] KL of each row (0 for a row without used slots)
    alpha: torch.Tensor  # [c]
    beta: torch.Tensor  # [c]
    gamma: torch.Tensor  # [c]
    delta: torch.Tensor  # [c]
    grad_teacher: torch.Tensor  # [c, k], 0 on unused slots


def compute_row_terms(
    z_teacher: torch.Tensor,
    lse_complement: Optional[torch.Tensor],
    teacher_logprobs: torch.Tensor,
    valid: torch.Tensor,
    teacher_tail_logprob: Optional[torch.Tensor],
    mode: str,
) -> RowTerms:
    """z_teacher: [c, k] scaled student logits on the slots, -inf on unused slots.
    lse_complement: [c] log-sum-exp of scaled logits outside the slots (-inf when the complement is
    empty); None in "topk" mode, which never looks outside the slots.
    teacher_logprobs: [c, k], 0 on unused slots. valid: [c, k] bool."""
    zero = torch.zeros((), dtype=z_teacher.dtype, device=z_teacher.device)
    lse_teacher = z_teacher.logsumexp(dim=-1)  # -inf for a row without used slots
    has_valid = valid.any(dim=-1)

    if mode == "topk":
        # KL(p_hat || q_hat) over the slots only: q_hat = softmax of the k logits.
        filler = torch.where(has_valid, NEG_INF, 0.0)[:, None]
        log_p_hat = teacher_logprobs - torch.where(valid, teacher_logprobs, filler).logsumexp(-1, keepdim=True)
        log_q_hat = z_teacher - torch.where(has_valid, lse_teacher, 0.0)[:, None]
        p_hat = torch.where(valid, log_p_hat.exp(), 0.0)
        loss = torch.where(valid, p_hat * (log_p_hat - log_q_hat), 0.0).sum(-1)
        grad_teacher = torch.where(valid, log_q_hat.exp() - p_hat, 0.0)
        zeros = zero.expand(loss.shape)
        return RowTerms(loss, zeros, zeros, zeros, zeros, grad_teacher)

    lse = torch.logaddexp(lse_complement, lse_teacher)  # full-vocabulary log-sum-exp
    log_q_teacher = z_teacher - lse[:, None]
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
        # The tail bucket only exists when the teacher leaves mass there and the student has tokens there.
        active = (r > 0) & (lse_complement > NEG_INF)
        r = torch.where(active, r, 0.0)
        log_one_minus_q = lse_complement - lse  # log(1 - Q), a log-sum-exp over the complement: never 1 - Q
        tail = r * (torch.where(active, log_r, 0.0) - torch.where(active, log_one_minus_q, 0.0))
        loss = loss + tail
        log_q_mass = lse_teacher - lse  # log Q
        # gamma * exp(z_v - delta) = r * Q / (1 - Q) * q_v; delta = lse for inactive rows keeps it finite.
        delta = torch.where(active, lse_complement - log_q_mass, lse)
    else:  # "sampled": the same family with no tail bucket
        r = zero.expand(mass.shape)
        delta = lse

    # dL/dz_v = (mass + r) q_v - r [v outside] q_v / (1 - Q) - p_v  (docs/design.md, eq. G)
    grad_teacher = torch.where(valid, (mass + r)[:, None] * log_q_teacher.exp() - p, 0.0)
    return RowTerms(loss, mass, lse, r, delta, grad_teacher)
