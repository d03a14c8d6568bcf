"""``replay_step`` with a trainable lm_head holds one precomputed weight gradient, not one per fused loss.

``fused_replay_kl`` computes its gradients in the forward (docs/design.md, section 3). A step adds two or
three fused losses over the same lm_head (task NLL + w * replay KL, and the replay NLL under
``loss="kl+nll"``); each used to keep its own [V, D] weight gradient from its forward to the backward: 1 GiB
apiece at the Llama-3-8B head in bf16. Here a TorchDispatchMode tracks every storage of the lm_head
weight's shape created during the step, from creation until freed, and the peak of their bytes must be
one weight gradient, while the gradients equal a float64 reference on the model's full logits.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import selfreplay_fast as sf
from test_replay_nll import grads, reference_terms, replay, tiny_model  # noqa: F401 (replay: the fixture)


class _WeightShapedPeak(TorchDispatchMode):
    """Peak bytes of the live storages shaped like ``weight`` ([V, D]) that ops create inside the mode."""

    def __init__(self, weight):
        super().__init__()
        self.shape = tuple(weight.shape)
        self.current = self.peak = 0
        self._alive = {}

    def _free(self, key):
        self.current -= self._alive.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # views, in-place, out=: no new storage
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                st = t.untyped_storage()
                if id(st) not in self._alive:
                    self._alive[id(st)] = st.nbytes()
                    self.current += st.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(st, self._free, id(st))
        return out


def _task_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 61, (3, 9), generator=g)
    attention = (torch.arange(9) < torch.tensor([[9], [5], [7]])).long()
    return {"input_ids": ids, "attention_mask": attention, "labels": ids.masked_fill(attention == 0, -100)}


def _task_reference(model, task):
    """Hugging Face's next-token loss, from the full logits in float64 (its own loss rounds them to fp32)."""
    logits = model(input_ids=task["input_ids"], attention_mask=task["attention_mask"]).logits.double()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), task["labels"][:, 1:].flatten())


@pytest.mark.parametrize("replay_loss", ["kl", "nll", "kl+nll"])
def test_replay_step_holds_one_weight_gradient_and_equals_the_reference(replay, replay_loss):
    model = tiny_model(seed=2).train()
    # The input embedding is [V, D] too; frozen, every tracked storage is a gradient of the lm_head.
    model.model.embed_tokens.weight.requires_grad_(False)
    head = model.lm_head.weight
    b = next(replay.batches(4, seed=0))
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    task, w, nll_weight = _task_batch(), 3.0, 0.3
    loss_fn = sf.ReplayKLLoss(impl="torch", chunk_size=5, loss=replay_loss, nll_weight=nll_weight)
    with _WeightShapedPeak(head) as tracked:
        out = sf.replay_step(model, task, b, w, replay_loss=loss_fn)
        out.loss.backward()
    got = grads(model)
    # Before: one precomputed gradient per fused loss (2 for "kl" and "nll", 3 for "kl+nll").
    assert tracked.peak == head.nbytes, f"peak {tracked.peak} B of [V, D] storages, one gradient is {head.nbytes} B"
    assert out.task_loss.grad_fn is None and out.replay_kl.grad_fn is None  # only the sum is backpropagated

    model.zero_grad(set_to_none=True)
    kl, nll, mask = reference_terms(model, b, 1.0)
    replay_ref = {"kl": kl[mask].mean(), "nll": nll[mask].mean(),
                  "kl+nll": (1 - nll_weight) * kl[mask].mean() + nll_weight * nll[mask].mean()}[replay_loss]
    task_ref = _task_reference(model, task)
    (task_ref + w * replay_ref).backward()
    ref = grads(model)
    torch.testing.assert_close(out.task_loss, task_ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.replay_kl.double(), replay_ref.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out.loss.detach(), out.task_loss + w * out.replay_kl, rtol=1e-12, atol=0)
    assert got.keys() == ref.keys() and "lm_head.weight" in got
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def test_a_share_survives_a_replay_weight_of_zero(replay):
    """w = 0: the replay term joins no share (its relative coefficient would be 0) and adds nothing."""
    model = tiny_model(seed=2).train()
    b = next(replay.batches(4, seed=0))
    b = {k: (v.double() if v.is_floating_point() else v) for k, v in b.items()}
    task = _task_batch()
    sf.replay_step(model, task, b, 0.0, replay_loss=sf.ReplayKLLoss(impl="torch")).loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    _task_reference(model, task).backward()
    ref = grads(model)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-8, msg=lambda m: f"{name}: {m}")


def _head_inputs(seed, rows=7, dim=6, vocab=11, k=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)])
    logprobs = torch.log_softmax(torch.randn(rows, k + 1, generator=g, dtype=torch.float64), -1)[:, :k]
    return hidden, ids, logprobs


@pytest.mark.parametrize("divisors", [(torch.tensor(5), torch.tensor(9)), (4.0, torch.tensor(3)),
                                      (torch.tensor(2), None)])
def test_tensor_divisors_share_one_gradient_exactly(divisors):
    """sum_a / d_a + 2.5 * sum_b / d_b with d tensors (token counts): one [V, D] gradient held, and the
    gradients equal plain autograd on the reference, whichever of the two divisors is a tensor."""
    from selfreplay_fast._weight_grad_share import loss_term, shared_weight_grad

    weight = torch.randn(11, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64, requires_grad=True)
    (ha, ia, la), (hb, ib, lb) = _head_inputs(1), _head_inputs(2)
    ha.requires_grad_(True)
    hb.requires_grad_(True)
    da, db = divisors

    def div(x, d):
        return x if d is None else x / d

    with _WeightShapedPeak(weight) as tracked:
        with shared_weight_grad():
            with loss_term(divisor=da):
                a = sf.fused_replay_kl(ha, weight, ia, la, reduction="sum", impl="torch")
            with loss_term(2.5, divisor=db):
                b = sf.fused_replay_kl(hb, weight, ib, lb, reduction="sum", impl="torch")
        total = div(a, da) + 2.5 * div(b, db)
        held = tracked.current
    total.backward()
    got = (ha.grad, hb.grad, weight.grad)
    assert held == weight.nbytes

    for t in (ha, hb, weight):
        t.grad = None
    ref = div(sf.reference_replay_kl(ha, weight, ia, la, reduction="sum"), da) + 2.5 * div(
        sf.reference_replay_kl(hb, weight, ib, lb, reduction="sum"), db)
    ref.backward()
    torch.testing.assert_close(total.detach(), ref.detach(), rtol=1e-12, atol=0)
    for g, r in zip(got, (ha.grad, hb.grad, weight.grad)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_loss_term_refuses_bad_divisors():
    from selfreplay_fast._weight_grad_share import loss_term

    for bad, error, words in ((0, ValueError, "divisor must be > 0"), (True, TypeError, "divisor must be"),
                              (torch.ones(2), ValueError, "divisor must be a scalar tensor"),
                              ("3", TypeError, "divisor must be")):
        with pytest.raises(error, match=words):
            with loss_term(divisor=bad):
                pass
