"""The two vocabulary passes of a logits chunk in plain PyTorch (the CPU path).

Same contract as ``selfreplay_fast.kernels.vocab_pass`` (the Triton version); see that module and
docs/design.md, section 3. A chunk of raw logits x [c, V] is read twice: ``masked_lse`` gathers the
teacher logits, masks the teacher's slots with -inf and reduces the rest to a log-sum-exp (as max
and log-sum);
``softmax_grad`` writes dL/dx with per-row scalars. One difference from the Triton contract:
``masked_lse`` leaves the chunk scaled (z = x * inv_temp, teacher slots -inf), and ``softmax_grad``
reads it as such. No [c, V] temporaries beyond torch.logsumexp's own. ``scale_`` is the Triton
module's too: a 16-bit gradient times an fp32 scale, the product in fp32.
"""

from __future__ import annotations

import torch

from ._row_terms import compute_row_terms


def masked_lse(logits: torch.Tensor, ids: torch.Tensor, inv_temp: float):
    valid = ids >= 0
    safe_ids = ids.clamp_min(0)
    z_teacher = torch.where(valid, logits.gather(1, safe_ids) * inv_temp, float("-inf"))
    # amin with +inf leaves a column alone, with -inf masks it: unused slots (id clamped to 0) can
    # never unmask a used id 0, whatever order the scatter runs in.
    fill = torch.where(valid, float("-inf"), float("inf")).to(logits.dtype)
    logits.scatter_reduce_(1, safe_ids, fill, reduce="amin")
    # The complement's log-sum-exp as (max, log-sum relative to it): see kernels/vocab_pass.py. In
    # place, no [c, V] temporary: the chunk becomes z - max, whose log-sum-exp is the log-sum exactly
    # (values <= 0), then z again (exact where exp(z - max) is not negligible: Sterbenz).
    if inv_temp != 1.0:
        logits.mul_(inv_temp)
    max_complement = logits.amax(dim=-1)  # NaN if a z is NaN, +inf if one is +inf, -inf if empty
    origin = torch.where(torch.isfinite(max_complement), max_complement, 0.0)[:, None]
    logsum_complement = torch.logsumexp(logits.sub_(origin), dim=-1)
    logits.add_(origin)
    return z_teacher, max_complement, logsum_complement


def narrow_grad_view(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [c, V] tensor of a narrower ``dtype`` in ``logits``' own storage, row n in the first bytes of logits'
    row n (row stride unchanged in bytes): softmax_grad's ``out`` for a 16-bit gradient."""
    return logits.view(dtype)[:, : logits.shape[1]]


def softmax_grad(logits, ids, grad_teacher, sign, origin, log_coef, inv_temp: float, out):
    """``logits`` as left by :func:`masked_lse`: already scaled by ``inv_temp`` (unused here)."""
    dense = logits  # the logits are not needed afterwards: computed in place, no [c, V] temporaries
    # exp((z - origin) + log_coef): two steps, each on its own scale (_row_terms.py). An empty
    # complement (origin -inf) has z = -inf everywhere: origin 0 gives exp(-inf) = 0, never NaN.
    origin = torch.where(origin == float("-inf"), 0.0, origin)
    dense.sub_(origin[:, None]).add_(log_coef[:, None]).exp_().mul_(sign[:, None])
    # A zero sign (a row that does not count) is an exact 0, even where its logits are inf/NaN.
    dense.masked_fill_((sign == 0)[:, None], 0.0)
    # The teacher's slots hold exp(-inf) = 0 after the dense formula: add their sparse values.
    dense.scatter_add_(1, ids.clamp_min(0), torch.where(ids >= 0, grad_teacher, 0.0))
    if dense is out:
        return out
    if out.untyped_storage()._cdata != dense.untyped_storage()._cdata:
        return out.copy_(dense)
    # A narrower out in the logits' own storage (narrow_grad_view): row n of out overlaps only row n of
    # dense, so rounding blocks of rows in order never overwrites an unconverted value; each block goes
    # through a small temporary.
    rows_per_block = max(1, (1 << 22) // max(1, dense.shape[1]))
    for start in range(0, dense.shape[0], rows_per_block):
        rows = slice(start, start + rows_per_block)
        out[rows] = dense[rows].to(out.dtype)
    return out


# Elements per block of scale_'s fp32 temporary (64 MiB).
SCALE_BLOCK = 1 << 24


def scale_(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """values *= scale in place (values 16-bit and contiguous, scale a one-element fp32 tensor), the
    product formed in fp32 and rounded once: ``values.mul_(scale)`` would round scale to 16 bits first
    (PyTorch's type promotion for a 0-dim operand). In blocks through an fp32 temporary."""
    flat = values.view(-1)
    for start in range(0, flat.numel(), SCALE_BLOCK):
        block = flat[start : start + SCALE_BLOCK]
        block.copy_(block.to(torch.float32).mul_(scale))
    return values


def lse_and_row_terms(logits, ids, inv_temp, teacher_logprobs, teacher_tail_logprob, mode, vocab_size, row_scale,
                      loss_out, *, combine=None):
    """:func:`masked_lse` and the per-row scalars (``selfreplay_fast._row_terms``): the contract of the
    Triton module's ``lse_and_row_terms`` (loss_out written; scaled scalars in logits.dtype, or None
    without row_scale). ``combine``: a vocab-parallel rank's hook (``combine_lse`` and ``valid_ids``, the
    global ids), or None."""
    z_teacher, max_complement, logsum_complement = masked_lse(logits, ids, inv_temp)
    valid_ids = ids
    if combine is not None:
        z_teacher, max_complement, logsum_complement = combine.combine_lse(z_teacher, max_complement,
                                                                           logsum_complement)
        valid_ids = combine.valid_ids
    terms = compute_row_terms(z_teacher, max_complement, logsum_complement, teacher_logprobs, valid_ids >= 0,
                              teacher_tail_logprob, mode, vocab_size)
    loss_out.copy_(terms.loss)
    if row_scale is None:
        return None
    # In the logits' dtype: an fp64 weight with fp32 hidden gives fp64 logits but fp32 row terms.
    return tuple(t.to(logits.dtype) for t in terms.scaled(row_scale))


def topk_row_terms(z_teacher, ids, teacher_logprobs, row_scale, loss_out):
    """Mode "topk"'s per-row scalars (``compute_row_terms(..., "topk")``): the contract of the Triton
    module's ``topk_row_terms`` (loss_out written; row_scale * dL/dz on the slots, or None without
    row_scale). ``ids``: the global teacher ids (which slots are used)."""
    terms = compute_row_terms(z_teacher, None, None, teacher_logprobs, ids >= 0, None, "topk")
    loss_out.copy_(terms.loss)
    if row_scale is None:
        return None
    return terms.grad_teacher * row_scale[:, None]
