"""The per-row scalars of a logits chunk in one Triton kernel (docs/design.md, sections 2 and 3).

``_row_terms_kernel`` runs one program per row after ``vocab_pass._lse_partials_kernel``. It combines
the vocabulary splits' partial (max, sum-exp) pairs into the complement's log-sum-exp and, with
``ROW_TERMS``, evaluates everything ``selfreplay_fast._row_terms.compute_row_terms`` and
``RowTerms.scaled`` compute (the loss of the row, the dense gradient's sign and log-coefficient, the
slots' gradient), formula for formula, in the logits' dtype. Loss modes differ only in constexpr
flags: ``TAIL`` adds the tail bucket ("tail"), without it the family is "sampled". Mode "topk" makes
no vocabulary pass and has no dense gradient: its sibling ``_topk_row_terms_kernel`` (one program per
row, the same slot helpers) computes the loss and the scaled slot gradients from the slots alone. NaN
and +/-inf propagate as through the PyTorch functions (torch.maximum, logsumexp, logaddexp): ``tl.maximum`` may
drop a NaN on a GPU, so NaNs are tracked explicitly, and no log of 0 is ever evaluated (the
interpreter's numpy would warn).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _is_nan(x):
    return x != x


@triton.jit
def _nan_max(a, b):
    """torch.maximum: NaN if either is NaN."""
    return tl.where(_is_nan(a) | _is_nan(b), float("nan"), tl.where(a > b, a, b))


@triton.jit
def _safe_log(x):
    """log(x) for x >= 0 or NaN, -inf at 0 without evaluating log(0)."""
    return tl.where(x == 0, float("-inf"), tl.log(tl.where(x == 0, 1.0, x)))


@triton.jit
def _log1p(x):
    """log(1 + x) for x in [0, 1], accurate for small x (Goldberg: log(u) * x / (u - 1), u = 1 + x)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _expm1(x):
    """exp(x) - 1 for x <= 0, accurate near 0 (Kahan: (u - 1) x / log(u), u = exp(x))."""
    u = tl.exp(x)
    log_u = tl.where(u == 1.0, 1.0, tl.log(tl.where(u == 0.0, 1.0, u)))
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * x / log_u))


@triton.jit
def _logaddexp(a, b):
    """torch.logaddexp: a when a == b is infinite, else max + log1p(exp(-|a - b|)); NaN propagates."""
    big = _nan_max(a, b)
    same_inf = (a == b) & ((a == float("inf")) | (a == float("-inf")))
    gap = tl.where(same_inf, 0.0, tl.abs(a - b))
    return tl.where(same_inf, a, big + _log1p(tl.exp(-gap)))


@triton.jit
def _load_slots(ids_ptr, ids_row_stride, ids_col_stride, z_teacher_ptr, logprobs_ptr, logprobs_row_stride,
                logprobs_col_stride, row, k0, K, cdt: tl.constexpr, BLOCK_K: tl.constexpr):
    """Slots [k0, k0 + BLOCK_K) of a row: (slot, in range, used, z_T (-inf past K), log p_t in ``cdt``, 0
    on unused slots)."""
    slot = k0 + tl.arange(0, BLOCK_K)
    in_range = slot < K
    ids = tl.load(ids_ptr + row * ids_row_stride + slot * ids_col_stride, mask=in_range, other=-1)
    valid = in_range & (ids >= 0)
    z = tl.load(z_teacher_ptr + row * K + slot, mask=in_range, other=float("-inf"))
    lp = tl.load(logprobs_ptr + row * logprobs_row_stride + slot * logprobs_col_stride, mask=valid,
                 other=0.0).to(cdt)
    return slot, in_range, valid, z, lp


@triton.jit
def _row_terms_kernel(
    part_max_ptr,  # [c, S] per split: max of z over the split's complement columns (NaN / +inf if seen)
    part_sum_ptr,  # [c, S] per split: sum of exp(z - part_max) over the same columns (0 for none)
    part_row_stride,
    num_splits,  # S
    z_teacher_ptr,  # [c, K] scaled logits on the slots, -inf on unused slots (row stride K)
    ids_ptr,  # [c, K] teacher ids, -1 = unused slot
    ids_row_stride,
    ids_col_stride,
    logprobs_ptr,  # [c, K] teacher log-probabilities log p_t (0 on unused slots)
    logprobs_row_stride,
    logprobs_col_stride,
    tail_logprob_ptr,  # [c] log r, the teacher's exact tail mass (HAS_TAIL_LOGPROB), else unused
    row_scale_ptr,  # [c] s_n = row weight / T: every gradient output is s_n dL/dz (WITH_GRAD)
    vocab_size,  # the whole vocabulary's size: a row with K_valid = V has no tail bucket
    max_c_ptr,  # out [c]: m_c, max of z over the complement (NaN if one is NaN, else +inf if one is)
    logsum_c_ptr,  # out [c]: l_c = log sum exp(z - m_c) over the complement; LSE_c = m_c + l_c
    loss_ptr,  # out [c] (ROW_TERMS): KL of the row, sum_t p_t (log p_t - log q_t) (+ tail term)
    sign_ptr,  # out [c] (WITH_GRAD): sign of the dense gradient times sign(s_n); 0 for s_n = 0
    log_coef_ptr,  # out [c] (WITH_GRAD): log|coef| - l_c + log|s_n|; dL/dz_v = sign exp((z_v - m_c) + log_coef)
    grad_teacher_ptr,  # out [c, K] (WITH_GRAD): s_n dL/dz_t on used slots, 0 on unused (row stride K)
    K,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_TERMS: tl.constexpr,  # False: only the combine (m_c, l_c), for vocab-parallel ranks
    TAIL: tl.constexpr,  # mode "tail" (else "sampled": no tail bucket)
    HAS_TAIL_LOGPROB: tl.constexpr,  # tail mass from tail_logprob_ptr, else r = clamp(1 - sum p, 0, 1)
    WITH_GRAD: tl.constexpr,  # write sign, log_coef, grad_teacher (forward-only calls skip them)
):
    row = tl.program_id(0).to(tl.int64)
    neg_inf = float("-inf")
    pos_inf = float("inf")
    cdt = max_c_ptr.dtype.element_ty  # the logits' dtype (fp32 or fp64)

    # Combine the splits: m_c = max of the finite split maxima, l_c = log sum_s sum_s exp(max_s - m_c).
    any_nan = tl.zeros([], tl.int32)
    any_inf = tl.zeros([], tl.int32)
    m_c = tl.full([], neg_inf, cdt)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        pm = tl.load(part_max_ptr + row * part_row_stride + s, mask=s < num_splits, other=neg_inf)
        any_nan = tl.maximum(any_nan, tl.max(_is_nan(pm).to(tl.int32), axis=0))
        any_inf = tl.maximum(any_inf, tl.max((pm == pos_inf).to(tl.int32), axis=0))
        pm = tl.where(_is_nan(pm) | (pm == pos_inf), neg_inf, pm)
        m_c = tl.maximum(m_c, tl.max(pm, axis=0))
    safe_m_c = tl.where(m_c == neg_inf, 0.0, m_c)
    total = tl.zeros([], cdt)
    for s0 in range(0, num_splits, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        in_range = s < num_splits
        pm = tl.load(part_max_ptr + row * part_row_stride + s, mask=in_range, other=neg_inf)
        ps = tl.load(part_sum_ptr + row * part_row_stride + s, mask=in_range, other=0.0)
        finite = (pm != neg_inf) & (pm != pos_inf) & (pm == pm)
        total += tl.sum(tl.where(finite, ps * tl.exp(tl.where(finite, pm, 0.0) - safe_m_c), 0.0), axis=0)
    logsum_c = tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)), neg_inf)
    max_c = tl.where(any_nan > 0, float("nan"), tl.where(any_inf > 0, pos_inf, m_c))
    tl.store(max_c_ptr + row, max_c)
    tl.store(logsum_c_ptr + row, logsum_c)

    if ROW_TERMS:
        # Pass 1 over the slots: max of z_T (NaN tracked), the number of used slots, mass = sum_t p_t.
        zt_max = tl.full([], neg_inf, cdt)
        zt_nan = tl.zeros([], tl.int32)
        n_valid = tl.zeros([], tl.int32)
        mass = tl.zeros([], cdt)
        for k0 in range(0, K, BLOCK_K):
            _, _, valid, z, lp = _load_slots(ids_ptr, ids_row_stride, ids_col_stride, z_teacher_ptr, logprobs_ptr,
                                             logprobs_row_stride, logprobs_col_stride, row, k0, K, cdt, BLOCK_K)
            zt_nan = tl.maximum(zt_nan, tl.max(_is_nan(z).to(tl.int32), axis=0))
            zt_max = tl.maximum(zt_max, tl.max(tl.where(_is_nan(z), neg_inf, z), axis=0))
            n_valid += tl.sum(valid.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(valid, tl.exp(lp), 0.0), axis=0)
        # row_max = max(m_c, max z_T) (0 when -inf); z_rel = z_T - row_max.
        row_max = tl.where(max_c > zt_max, max_c, zt_max)
        row_max = tl.where((zt_nan > 0) | _is_nan(max_c), float("nan"), row_max)
        row_max = tl.where(row_max == neg_inf, 0.0, row_max)
        # Pass 2: lse_T = logsumexp(z_rel) as torch computes it (an infinite max shifts by 0).
        zr_max = tl.where(zt_nan > 0, float("nan"), zt_max - row_max)
        shift = tl.where((zr_max == pos_inf) | (zr_max == neg_inf), 0.0, zr_max)
        sum_t = tl.zeros([], cdt)
        for k0 in range(0, K, BLOCK_K):
            slot = k0 + tl.arange(0, BLOCK_K)
            z = tl.load(z_teacher_ptr + row * K + slot, mask=slot < K, other=neg_inf)
            sum_t += tl.sum(tl.exp((z - row_max) - shift), axis=0)
        lse_teacher = _safe_log(sum_t) + shift
        lse_complement = (max_c - row_max) + logsum_c
        lse = _logaddexp(lse_complement, lse_teacher)  # the full vocabulary's, relative to row_max
        lse = tl.where(lse == pos_inf, float("nan"), lse)  # a +inf logit: NaN, as log_softmax gives
        log_one_minus_q = lse_complement - lse  # log(1 - Q)
        log_q_mass = lse_teacher - lse  # log Q
        if TAIL:
            if HAS_TAIL_LOGPROB:
                log_r = tl.load(tail_logprob_ptr + row).to(cdt)
                r = tl.exp(log_r)
            else:
                r = 1.0 - mass
                r = tl.where(r < 0, 0.0, tl.where(r > 1, 1.0, r))  # clamp(0, 1), NaN stays NaN
                log_r = _safe_log(r)
            active = (r > 0) & (n_valid < vocab_size)
            r = tl.where(active, r, 0.0)
            tail = r * (tl.where(active, log_r, 0.0) - tl.where(active, log_one_minus_q, 0.0))
            log_subtracted = tl.where(active, tl.log(tl.where(active, r, 1.0)) + log_q_mass, neg_inf)
        else:
            r = tl.zeros([], cdt)
            tail = tl.zeros([], cdt)
            log_subtracted = tl.full([], neg_inf, cdt)
        if WITH_GRAD:
            scale = tl.load(row_scale_ptr + row).to(cdt)
        # Pass 3: the slots' loss terms and gradient (mass + r) q_t - p_t, times s_n.
        loss = tl.zeros([], cdt)
        for k0 in range(0, K, BLOCK_K):
            slot, in_range, valid, z, lp = _load_slots(ids_ptr, ids_row_stride, ids_col_stride, z_teacher_ptr,
                                                       logprobs_ptr, logprobs_row_stride, logprobs_col_stride, row,
                                                       k0, K, cdt, BLOCK_K)
            log_q = (z - row_max) - lse
            p = tl.where(valid, tl.exp(lp), 0.0)
            loss += tl.sum(tl.where(valid, p * (lp - log_q), 0.0), axis=0)
            if WITH_GRAD:
                g = tl.where(valid, (mass + r) * tl.exp(log_q) - p, 0.0)
                tl.store(grad_teacher_ptr + row * K + slot, g * scale, mask=in_range)
        if TAIL:
            loss = loss + tail
        tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
        if WITH_GRAD:
            # sign and log|a - b| of the dense coefficient, a = mass (1 - Q), b = r Q, in log space.
            log_a = _safe_log(mass) + log_one_minus_q
            log_b = log_subtracted
            big = _nan_max(log_a, log_b)
            both_zero = big == neg_inf
            gap = tl.abs(log_a - log_b)
            log_abs = big + _safe_log(-_expm1(-tl.where(both_zero, 1.0, gap)))
            sign = tl.where(log_a > log_b, 1.0, tl.where(log_b > log_a, -1.0, 0.0))
            log_abs = tl.where(both_zero | (sign == 0), neg_inf, log_abs)
            sign = tl.where(_is_nan(lse), float("nan"), sign)
            log_coef = tl.where(max_c == neg_inf, neg_inf, log_abs - logsum_c)
            # Scaled by s_n (RowTerms.scaled): sign(s_n), log|s_n|; s_n = 0 gives sign 0, an exact 0.
            sign = tl.where(scale == 0, 0.0, sign * tl.where(scale > 0, 1.0, tl.where(scale < 0, -1.0, 0.0)))
            log_coef = log_coef + _safe_log(tl.abs(scale))
            tl.store(sign_ptr + row, sign.to(cdt))
            tl.store(log_coef_ptr + row, log_coef.to(cdt))


@triton.jit
def _topk_row_terms_kernel(
    z_teacher_ptr,  # [c, K] scaled logits on the slots, -inf on unused slots (row stride K)
    ids_ptr,  # [c, K] teacher ids (global), -1 = unused slot
    ids_row_stride,
    ids_col_stride,
    logprobs_ptr,  # [c, K] teacher log-probabilities log p_t (0 on unused slots)
    logprobs_row_stride,
    logprobs_col_stride,
    row_scale_ptr,  # [c] s_n = row weight / T (WITH_GRAD)
    loss_ptr,  # out [c]: sum_t p^_t (log p^_t - log q^_t), 0 for a row without used slots
    grad_teacher_ptr,  # out [c, K] (WITH_GRAD): s_n (q^_t - p^_t) on used slots, 0 on unused (row stride K)
    K,
    BLOCK_K: tl.constexpr,
    WITH_GRAD: tl.constexpr,
):
    """Mode "topk" (compute_row_terms(..., "topk") and the row scale), formula for formula in z's dtype:
    log p^ = log p - logsumexp_T(log p), log q^ = log_softmax(z_T) over the k slots (unused ones -inf;
    a row without used slots reads z = 0, as the PyTorch path does, and gives exact zeros). As
    torch.log_softmax, a NaN or +inf slot logit, or every slot at -inf, makes the whole row NaN."""
    row = tl.program_id(0).to(tl.int64)
    neg_inf = float("-inf")
    pos_inf = float("inf")
    cdt = z_teacher_ptr.dtype.element_ty  # the slot logits' dtype (fp32 or fp64)

    # Pass 1: max of z_T and of the used log p (NaN tracked: tl.max may drop one), used-slot count.
    z_max = tl.full([], neg_inf, cdt)
    z_nan = tl.zeros([], tl.int32)
    lp_max = tl.full([], neg_inf, cdt)
    lp_nan = tl.zeros([], tl.int32)
    n_valid = tl.zeros([], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        _, _, valid, z, lp = _load_slots(ids_ptr, ids_row_stride, ids_col_stride, z_teacher_ptr, logprobs_ptr,
                                         logprobs_row_stride, logprobs_col_stride, row, k0, K, cdt, BLOCK_K)
        z_nan = tl.maximum(z_nan, tl.max(_is_nan(z).to(tl.int32), axis=0))
        z_max = tl.maximum(z_max, tl.max(tl.where(_is_nan(z), neg_inf, z), axis=0))
        lp_nan = tl.maximum(lp_nan, tl.max((valid & _is_nan(lp)).to(tl.int32), axis=0))
        lp_max = tl.maximum(lp_max, tl.max(tl.where(valid & ~_is_nan(lp), lp, neg_inf), axis=0))
        n_valid += tl.sum(valid.to(tl.int32), axis=0)
    has_valid = n_valid > 0
    # log_softmax's max m (NaN if any; +inf and all -inf give NaN below, as there); 0 without used slots.
    m = tl.where(has_valid, tl.where(z_nan > 0, float("nan"), z_max), 0.0)
    # logsumexp's shift: the max unless infinite (then 0), NaN kept.
    lp_shift = tl.where(lp_nan > 0, float("nan"), tl.where((lp_max == pos_inf) | (lp_max == neg_inf), 0.0, lp_max))
    # Pass 2: the two sums of exponentials.
    sum_q = tl.zeros([], cdt)
    sum_p = tl.zeros([], cdt)
    for k0 in range(0, K, BLOCK_K):
        _, in_range, valid, z, lp = _load_slots(ids_ptr, ids_row_stride, ids_col_stride, z_teacher_ptr,
                                                logprobs_ptr, logprobs_row_stride, logprobs_col_stride, row, k0, K,
                                                cdt, BLOCK_K)
        z = tl.where(has_valid | ~in_range, z, 0.0)
        sum_q += tl.sum(tl.exp(z - m), axis=0)
        sum_p += tl.sum(tl.where(valid, tl.exp(lp - lp_shift), 0.0), axis=0)
    log_sum_q = _safe_log(sum_q)
    lse_p = tl.where(has_valid, _safe_log(sum_p) + lp_shift, 0.0)
    if WITH_GRAD:
        scale = tl.load(row_scale_ptr + row).to(cdt)
    # Pass 3: the slots' loss terms and gradient q^_t - p^_t, times s_n.
    loss = tl.zeros([], cdt)
    for k0 in range(0, K, BLOCK_K):
        slot, in_range, valid, z, lp = _load_slots(ids_ptr, ids_row_stride, ids_col_stride, z_teacher_ptr,
                                                   logprobs_ptr, logprobs_row_stride, logprobs_col_stride, row, k0,
                                                   K, cdt, BLOCK_K)
        z = tl.where(has_valid | ~in_range, z, 0.0)
        log_q = (z - m) - log_sum_q
        log_p = lp - lse_p
        p = tl.where(valid, tl.exp(log_p), 0.0)
        loss += tl.sum(tl.where(valid, p * (log_p - log_q), 0.0), axis=0)
        if WITH_GRAD:
            g = tl.where(valid, tl.exp(log_q) - p, 0.0)
            tl.store(grad_teacher_ptr + row * K + slot, g * scale, mask=in_range)
    tl.store(loss_ptr + row, loss.to(loss_ptr.dtype.element_ty))
