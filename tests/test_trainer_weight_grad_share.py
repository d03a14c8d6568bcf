"""``ReplayTrainer``'s training step holds one precomputed lm_head weight gradient, not one per fused loss.

Its loss is world * task_sum / num_items_in_batch + w * world * replay_sum / replay_count (the counts of the
whole accumulation window, tensors): the two fused losses join one weight-gradient share whose relative
coefficient is a ratio of those tensors (_weight_grad_share.py), never read on the host. Here every
compute_loss runs under a TorchDispatchMode that tracks the storages shaped like the lm_head weight, and
the ones still alive when it returns (held until backward) must be a single gradient; one SGD step over an
accumulation window of 2 must equal the update computed from the model's full logits with the reference.
"""

import pytest
import torch

import selfreplay_fast as sf
from test_replay_nll import reference_terms
from test_replay_step_memory import _WeightShapedPeak
from test_training import assert_grads_close, grads, make_trainer, replay, tiny_model  # noqa: F401 (replay: fixture)


def _train_one_window(tmp_path, model, buffer, replay_loss):
    trainer = make_trainer(tmp_path, model, buffer, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant",
                           max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, replay_loss=replay_loss)
    head = model.lm_head.weight
    held, seen = [], []
    original = trainer.compute_loss

    def tracked_compute_loss(model_, inputs, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in inputs.items()})
        with _WeightShapedPeak(head) as tracked:
            loss = original(model_, inputs, *args, **kwargs)
            held.append(tracked.current)
        return loss

    trainer.compute_loss = tracked_compute_loss
    trainer.train()
    return held, seen, head.nbytes


def _reference_update(model, task_batches, replay_batches, w, nll_weight):
    """grad of task_sum / task_count + w * replay_sum / replay_count over the window, from full logits."""
    task_count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in task_batches)
    task_sum = 0
    for b in task_batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
        task_sum = task_sum + torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum")
    replay_count = sum(int(b["mask"].sum()) for b in replay_batches)
    replay_sum = 0
    for b in replay_batches:
        kl, nll, mask = reference_terms(model, b, 1.0)
        term = kl if nll_weight is None else (1 - nll_weight) * kl + nll_weight * nll
        replay_sum = replay_sum + term[mask].sum()
    (task_sum / task_count + w * replay_sum / replay_count).backward()
    return grads(model)


@pytest.mark.parametrize("loss, nll_weight", [("kl", None), ("kl+nll", 0.3)])
def test_trainer_step_holds_one_weight_gradient_and_equals_the_reference(tmp_path, replay, loss, nll_weight):
    model = tiny_model(seed=3)
    model.model.embed_tokens.weight.requires_grad_(False)  # [V, D] too: frozen, tracked storages are the head's
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    replay_loss = sf.ReplayKLLoss(mode=replay.mode, loss=loss, **({} if nll_weight is None else {"nll_weight": nll_weight}))
    held, seen, one_gradient = _train_one_window(tmp_path, model, replay, replay_loss)
    got = {n: before[n] - p.detach() for n, p in model.named_parameters()}
    # Before: one gradient per fused loss (task NLL, replay KL, and the replay NLL of "kl+nll") held from
    # each forward to its backward.
    assert held == [one_gradient, one_gradient], (held, one_gradient)

    expected_model = tiny_model(seed=3)
    expected_model.model.embed_tokens.weight.requires_grad_(False)
    window = list(replay.batches(2, seed=0))[:2]  # the replay stream's first pass, seed replay_seed = 0
    ref = _reference_update(expected_model, seen, window, 2.0, nll_weight)
    assert "lm_head.weight" in ref and "model.embed_tokens.weight" not in ref
    assert_grads_close({n: got[n] for n in ref}, {n: g.float() for n, g in ref.items()}, rtol=1e-4, atol=1e-6)
