"""Random replay-KL problems for the tests: a student head and a cached teacher of every mode."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

import selfreplay_fast as sf

from conftest import device_for


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    mask: Optional[torch.Tensor]
    teacher_tail_logprob: Optional[torch.Tensor]
    mode: str
    temperature: float
    extra: dict = field(default_factory=dict)

    def kwargs(self):
        kw = dict(bias=self.bias, mask=self.mask, mode=self.mode, temperature=self.temperature)
        if self.teacher_tail_logprob is not None:
            kw["teacher_tail_logprob"] = self.teacher_tail_logprob
        return kw

    def leaves(self, dtype, device="cpu", weight_grad=True):
        """Fresh autograd leaves of the student in ``dtype``."""
        def leaf(t, grad):
            return t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_(grad)

        return leaf(self.hidden, True), leaf(self.weight, weight_grad), (
            leaf(self.bias, True) if self.bias is not None else None
        )

    def teacher(self, device="cpu"):
        kw = self.kwargs()
        for name in ("mask", "teacher_tail_logprob"):
            if kw.get(name) is not None:
                kw[name] = kw[name].to(device)
        kw.pop("bias")
        return self.teacher_ids.to(device), self.teacher_logprobs.to(device), kw


def make_case(
    lead=(5,),
    dim=8,
    vocab=37,
    k=4,
    mode="tail",
    *,
    seed=0,
    bias=True,
    mask=True,
    unused_slots=True,
    temperature=1.0,
    logit_scale=3.0,
    teacher_scale=2.0,
    with_tail=False,
    id_dtype=torch.int64,
):
    """A student whose logits have std about ``logit_scale`` (large = peaked softmax) and a teacher
    that is a random softmax with std ``teacher_scale``, cached as top-k (tail/topk) or as k unique
    samples with log frequencies (sampled). Unused slots hold id -1 and a NaN log-prob, which must be
    ignored."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    hidden = torch.randn(*lead, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * (logit_scale / math.sqrt(dim))
    b = torch.randn(vocab, generator=g, dtype=torch.float64) * 0.5 if bias else None
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=g, dtype=torch.float64) * teacher_scale, -1)
    k = min(k, vocab)
    if mode == "sampled":
        draws = torch.multinomial(teacher.exp(), 3 * k, replacement=True, generator=g)  # [n, 3k]
        counts = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        top = counts.topk(k, dim=-1)  # the k most frequent sampled ids (renormalized below)
        ids = torch.where(top.values > 0, top.indices, -1)
        freq = torch.where(ids >= 0, top.values, 0.0)
        logprobs = torch.where(ids >= 0, (freq / freq.sum(-1, keepdim=True)).log(), float("nan"))
    else:
        top = teacher.topk(k, dim=-1)
        ids, logprobs = top.indices, top.values
        perm = torch.argsort(torch.rand(n, k, generator=g), dim=-1)  # slot order must not matter
        ids, logprobs = ids.gather(1, perm), logprobs.gather(1, perm)
    tail = None
    if unused_slots and k > 1:
        drop = torch.rand(n, k, generator=g) < 0.25
        drop[0] = False  # keep one full row
        if n > 2:
            drop[1] = True  # and one row without any used slot
        ids = torch.where(drop, -1, ids)
        logprobs = torch.where(drop, float("nan"), logprobs)
        if mode == "sampled":  # a sampled cache's frequencies always sum to 1 over its used slots
            logprobs = logprobs - torch.where(ids >= 0, logprobs, float("-inf")).logsumexp(-1, keepdim=True)
    if with_tail:  # the exact log-mass of the teacher outside the used slots
        tail = log_mass_outside(teacher, ids).reshape(lead)
    m = None
    if mask:
        m = torch.rand(lead, generator=g) < 0.8
        m.view(-1)[0] = True
    return Case(
        hidden=hidden,
        weight=weight,
        bias=b,
        teacher_ids=ids.reshape(*lead, k).to(id_dtype),
        teacher_logprobs=logprobs.reshape(*lead, k).float(),
        mask=m,
        teacher_tail_logprob=tail.float() if tail is not None else None,
        mode=mode,
        temperature=temperature,
        extra={"teacher": teacher},
    )


def rel_err(actual, expected):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def log_mass_outside(logprobs, ids):
    """log of the mass of ``logprobs`` [n, V] outside the used ids [n, k] of each row."""
    used = torch.zeros(logprobs.shape, dtype=torch.int32).scatter_add_(1, ids.clamp_min(0), (ids >= 0).int()) > 0
    return logprobs.masked_fill(used, float("-inf")).logsumexp(-1)


def run(fn, case, dtype, device="cpu", reduction="mean", grad_seed=0, weight_grad=True, **kw):
    """Loss and gradients (hidden, weight, bias) of sum(loss * random grad_output)."""
    h, w, b = case.leaves(dtype, device, weight_grad=weight_grad)
    ids, lp, tkw = case.teacher(device)
    loss = fn(h, w, ids, lp, bias=b, reduction=reduction, **tkw, **kw)
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = (torch.rand(loss.shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(loss.dtype).to(device)
    (loss * grad_out).sum().backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def assert_close_to_reference(case, impl, dtype, tol, reduction="mean", device=None, **kw):
    device = device or device_for(impl)
    ref = run(sf.reference_replay_kl, case, torch.float64, "cpu", reduction)
    got = run(sf.fused_replay_kl, case, dtype, device, reduction, impl=impl, **kw)
    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    for name, a, e in zip(names, got, ref):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape, name
        assert torch.isfinite(a).all(), f"{name} has inf/NaN"
        if e.norm() == 0:
            assert a.abs().max().item() == 0, name
        else:
            err = rel_err(a, e)
            assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return ref
